// The CUDA GEMV's arithmetic (qdec/gemv_block.h) run on the host: the decode
// trick, the per-block scale/zero factoring and the thread's walk over rows
// and blocks, against a plain dequantize-and-dot in double. The kernel adds
// only loads, shuffles and a shared-memory sum around this code, so a wrong
// bit position, straddling value or tail block shows up here without a GPU.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "catch.h"
#include "qdec/gemv_block.h"

namespace {

using qdec::kBlock;

// Inverse of qdec::unpack_one: value i of a block at bit offset bits*i.
void pack_block(const std::vector<uint32_t>& codes, int bits, uint32_t* words) {
  for (int i = 0; i < bits; ++i) words[i] = 0;
  for (int i = 0; i < kBlock; ++i) {
    const int lo = bits * i;
    const uint64_t v = static_cast<uint64_t>(codes[i]) << (lo & 31);
    words[lo >> 5] |= static_cast<uint32_t>(v);
    if ((lo & 31) + bits > 32) words[(lo >> 5) + 1] |= static_cast<uint32_t>(v >> 32);
  }
}

template <int BITS>
void check_one_hot_decode(std::mt19937& rng) {
  std::uniform_int_distribution<uint32_t> code(0, (1u << BITS) - 1);
  std::vector<uint32_t> codes(kBlock);
  for (auto& c : codes) c = code(rng);
  codes[0] = (1u << BITS) - 1;  // extremes at both ends
  codes[kBlock - 1] = (1u << BITS) - 1;
  uint32_t words[BITS];
  pack_block(codes, BITS, words);
  for (int i = 0; i < kBlock; ++i) {
    float x[kBlock] = {};
    x[i] = 1.f;
    const float sum = qdec::gemv::prescale_block<BITS>(x);
    REQUIRE(sum == 1.f);
    // One-hot x picks out q_i, exactly: the 2^pos factors cancel.
    INFO("bits " << BITS << " value " << i);
    REQUIRE(qdec::gemv::block_dot<BITS>(words, x) == static_cast<float>(codes[i]));
    REQUIRE(qdec::unpack_one<BITS>(words, i) == codes[i]);
  }
}

template <int BITS>
void check_block_term(std::mt19937& rng) {
  std::uniform_int_distribution<uint32_t> code(0, (1u << BITS) - 1);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<uint32_t> codes(kBlock);
    float x[kBlock];
    for (auto& c : codes) c = code(rng);
    for (auto& v : x) v = normal(rng) * (trial % 5 == 0 ? 100.f : 1.f);
    const float scale = std::abs(normal(rng)) * 0.01f + 1e-4f;
    const float zero = trial % 2 ? static_cast<float>(1 << (BITS - 1)) : 0.37f * (1 << BITS);
    double want = 0, magnitude = 0;
    for (int i = 0; i < kBlock; ++i) {
      const double w = (static_cast<double>(codes[i]) - zero) * scale;
      want += w * x[i];
      magnitude += std::abs(w * x[i]) + std::abs(zero * scale * x[i]);
    }
    uint32_t words[BITS];
    pack_block(codes, BITS, words);
    const float xsum = qdec::gemv::prescale_block<BITS>(x);
    const float got =
        qdec::gemv::block_term(qdec::gemv::block_dot<BITS>(words, x), xsum, scale, zero);
    // float32 sums of 32 terms, the zero applied to the block sum of x (so
    // the cancellation is bounded by the same magnitudes): a few ulps of it.
    INFO("bits " << BITS << " trial " << trial);
    REQUIRE(std::abs(got - want) <= 1e-6 * magnitude);
  }
}

// A whole matrix through gemv_thread, with the threads of a CTA run one
// after another and their partial sums added (what the kernel's shuffles and
// shared memory do).
template <int BITS>
void check_matrix(std::mt19937& rng, int64_t N, int64_t K, int64_t G, int64_t threads) {
  constexpr int kRows = 4;
  const int64_t blocks = (K + kBlock - 1) / kBlock;
  const int64_t groups = (K + G - 1) / G;
  const int64_t words_per_row = blocks * BITS;
  std::uniform_int_distribution<uint32_t> code(0, (1u << BITS) - 1);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<uint32_t> codes(N * blocks * kBlock, 0), packed(N * words_per_row);
  std::vector<float> scales(N * groups), zeros(N * groups), x(K);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) codes[n * blocks * kBlock + k] = code(rng);
  for (auto& s : scales) s = std::abs(normal(rng)) * 0.05f + 1e-3f;
  for (auto& z : zeros) z = static_cast<float>(code(rng));
  for (auto& v : x) v = normal(rng);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < blocks; ++c)
      pack_block(std::vector<uint32_t>(codes.begin() + (n * blocks + c) * kBlock,
                                       codes.begin() + (n * blocks + c + 1) * kBlock),
                 BITS, packed.data() + n * words_per_row + c * BITS);

  const auto load_x = [&](int64_t c, float (&out)[kBlock]) {
    for (int i = 0; i < kBlock; ++i) out[i] = c * kBlock + i < K ? x[c * kBlock + i] : 0.f;
  };
  const auto load_words = [&](int64_t n, int64_t c, uint32_t (&w)[BITS]) {
    for (int i = 0; i < BITS; ++i) w[i] = packed[n * words_per_row + c * BITS + i];
  };
  const auto params = [&](int64_t n, int64_t g, float& s, float& z) {
    s = scales[n * groups + g];
    z = zeros[n * groups + g];
  };
  for (int64_t n0 = 0; n0 < N; n0 += kRows) {
    float total[kRows] = {};
    for (int64_t t = 0; t < threads; ++t) {
      float acc[kRows] = {};
      qdec::gemv::gemv_thread<BITS, kRows>(n0, N, blocks, (G + kBlock - 1) / kBlock, t, threads,
                                           load_x, load_words, params, acc);
      for (int r = 0; r < kRows; ++r) total[r] += acc[r];
    }
    for (int r = 0; r < kRows && n0 + r < N; ++r) {
      const int64_t n = n0 + r;
      double want = 0, magnitude = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / G;
        const double w =
            (static_cast<double>(codes[n * blocks * kBlock + k]) - zeros[n * groups + g]) *
            scales[n * groups + g];
        want += w * x[k];
        magnitude += std::abs(w * x[k]) + std::abs(zeros[n * groups + g] * scales[n * groups + g] * x[k]);
      }
      INFO("bits " << BITS << " N " << N << " K " << K << " G " << G << " row " << n);
      // float32 accumulation over K values in a different order than the
      // double sum: a relative 1e-5 of the summed magnitudes.
      REQUIRE(std::abs(total[r] - want) <= 1e-5 * magnitude);
    }
  }
}

template <int BITS>
void check_width(std::mt19937& rng) {
  check_one_hot_decode<BITS>(rng);
  check_block_term<BITS>(rng);
  // Odd N (a partial last group of rows), a partial last block (K % 32),
  // groups of one block, several blocks and the whole row, and both one
  // block per thread and several (3 threads walking 10 blocks).
  check_matrix<BITS>(rng, 7, 300, 32, 128);
  check_matrix<BITS>(rng, 9, 300, 64, 3);
  check_matrix<BITS>(rng, 4, 300, 300, 5);  // G = K: one group, not a multiple of 32
  check_matrix<BITS>(rng, 1, 31, 31, 128);
  check_matrix<BITS>(rng, 5, 1024, 128, 128);
}

}  // namespace

TEST_CASE("GEMV block decode equals unpacking and a double dot", "[gemv]") {
  std::mt19937 rng(1234);
  check_width<2>(rng);
  check_width<3>(rng);
  check_width<4>(rng);
  check_width<5>(rng);
  check_width<6>(rng);
  check_width<7>(rng);
  check_width<8>(rng);
}
