// The loops of the CPU decode kernels, written once over an instruction-set
// "vector" type V and included by each SIMD level file (decode_avx2.cpp,
// decode_avx512.cpp) inside its own anonymous namespace, after the pragma
// that switches that file's target. So the loops exist once in the source and
// once per level in the binary, each compiled for its level, and no inline
// function is shared between levels (which could let the linker pick an
// AVX-512 copy for a CPU without it). This file includes nothing: the level
// file includes what it needs before its target pragma.
//
// V provides (a block is 32 codes of one packed row, bitpack.h):
//   Codes                          one decoded block (codes as 16-bit lanes)
//   template <int BITS> Decoder    Decoder(); Codes decode(const uint8_t* block) const
//   template <int BITS> static constexpr int kReadBytes
//                                  bytes decode reads from a block's start, up to 32
//                                  (those past the block are read but do not matter),
//                                  so the matrix's last blocks go through a copy
//   IAcc, zero_i(), madd(IAcc, Codes, const int16_t* x32)  int32 sums of codes * x
//   FAcc, zero_f(), fma(FAcc, IAcc, float), fma_f(FAcc a, float s, FAcc b) = a*s + b,
//   hsum(FAcc)
//                                                          float32 sums
//   axpy(const Codes&, float a, float* out32)               out += a * codes
//   dequantize(const Codes&, float zero, float scale, float* out, int len)
//
// The math, and why it is integer: csrc/include/qdec/cpu_decode.h.

// How many blocks at a row's end the decoder reads past the row from: block c
// of `blocks` is unsafe when (blocks - c) * 4*BITS < kReadBytes (1-3 blocks:
// at 2 bits a 32-byte load spans four 8-byte blocks).
template <typename V, int BITS>
constexpr int64_t overreading_tail_blocks() {
  constexpr int block_bytes = 4 * BITS;
  constexpr int over = V::template kReadBytes<BITS> - block_bytes;
  return over <= 0 ? 0 : (over + block_bytes - 1) / block_bytes;
}

// A row's packed block c (bits*4 bytes), read in place, except the last
// blocks of the matrix's last row from which the decoder would read past the
// row's end: those go through a zero-padded copy, since the bytes after the
// matrix may not be ours. (Past any other row's end lie the next row's codes:
// readable, and ignored by the decoder. Copying every row's last block
// instead cost ~10 % of a SmolLM2 decode step: it touched the row's end
// before its start, a cache miss the streaming prefetcher had not covered.)
template <typename V, int BITS>
struct RowBlocks {
  static constexpr int64_t kTail = overreading_tail_blocks<V, BITS>();
  static_assert(kTail * 4 * BITS + 32 <= 64, "the tail copy must hold every byte decode reads");
  const uint8_t* row;
  int64_t copied;  // first block read from `tail`; `blocks` (none) otherwise
  alignas(64) uint8_t tail[64];

  RowBlocks(const uint32_t* words, int64_t blocks, bool last_row)
      : row(reinterpret_cast<const uint8_t*>(words)),
        copied(last_row && kTail > 0 ? (blocks > kTail ? blocks - kTail : 0) : blocks) {
    if (copied < blocks) {
      for (int i = 0; i < 64; ++i) tail[i] = 0;
      const uint8_t* src = row + copied * 4 * BITS;
      for (int64_t i = 0; i < (blocks - copied) * 4 * BITS; ++i) tail[i] = src[i];
    }
  }
  const uint8_t* block(int64_t c) const {
    return c >= copied ? tail + (c - copied) * 4 * BITS : row + c * 4 * BITS;
  }
};

// sum_g scale[g] * zero[g] * xsum[g] with eight independent partial sums, so
// the compiler vectorises it and no chain of dependent adds (4 cycles each)
// sets the pace: at G = 32 a row has K/32 groups.
inline float zero_term(const float* scale, const float* zero, const float* xsum, int64_t groups) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8)
    for (int u = 0; u < 8; ++u) part[u] += scale[g + u] * zero[g + u] * xsum[g + u];
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; g < groups; ++g) sum += scale[g] * zero[g] * xsum[g];
  return sum;
}

// The float32 factor of every span, s_g * d_span, for BT rows of x: once per
// weight row, so the span loop below is flat (no group bookkeeping between
// blocks; at G = 32 every block is a span and that bookkeeping cost as much
// as the decode).
template <int BT>
inline void span_factors(const float* scale, const QuantizedActivations& x, int64_t b0,
                         float* factors) {
  for (int t = 0; t < BT; ++t) {
    const float* d = x.span_scale + (b0 + t) * x.spans;
    float* f = factors + t * x.spans;
    if (x.spans_per_group == 1) {  // G <= 128: one span per group, a vectorisable product
      for (int64_t sp = 0; sp < x.spans; ++sp) f[sp] = scale[sp] * d[sp];
      continue;
    }
    for (int64_t g = 0, sp = 0; sp < x.spans; ++g) {
      const int64_t sp_end = sp + x.spans_per_group < x.spans ? sp + x.spans_per_group : x.spans;
      for (; sp < sp_end; ++sp) f[sp] = scale[g] * d[sp];
    }
  }
}

// Over span sp's blocks, the integer dots of the codes with x's high and low
// int16 terms, then tot_hi[t] += factor * high, tot_lo[t] += factor * low
// (the caller scales tot_lo by 1/32768 once; cpu_decode.h). TERMS = 1
// (activation precision int16) skips the low terms: half the multiply-adds
// and per-span converts and FMAs.
// How far ahead in the code stream span_dot prefetches. Measured on
// Sapphire Rapids, qdec_infer SmolLM2 W4 g32 (rows of 288 bytes), one thread:
// 46 tokens per CPU-second without, 55-56 with any of 512..4096 bytes.
constexpr int64_t kPrefetchAhead = 1024;
template <typename V, int BITS, int BT, int TERMS>
inline void span_dot(const RowBlocks<V, BITS>& rb, const typename V::template Decoder<BITS>& dec,
                     const QuantizedActivations& x, int64_t b0, int64_t sp, const float* factors,
                     typename V::FAcc (&tot_hi)[BT], typename V::FAcc (&tot_lo)[BT]) {
  const int64_t stride = x.blocks * 64;
  const int64_t blocks_per_span = x.span / 32;
  typename V::IAcc hi[BT], lo[BT];
  for (int t = 0; t < BT; ++t) hi[t] = lo[t] = V::zero_i();
  const int64_t c_end = (sp + 1) * blocks_per_span < x.blocks ? (sp + 1) * blocks_per_span : x.blocks;
  auto dot_block = [&](int64_t c, const uint8_t* codes) {
    const typename V::Codes q = dec.decode(codes);
    for (int t = 0; t < BT; ++t) {
      const int16_t* xb = x.xq + (b0 + t) * stride + c * 64;
      hi[t] = V::madd(hi[t], q, xb);
      if constexpr (TERMS == 2) lo[t] = V::madd(lo[t], q, xb + 32);
    }
  };
  // Only the matrix's last block may need the padded copy (RowBlocks); the
  // others are read in place, with no per-block test in the loop.
  int64_t c = sp * blocks_per_span;
#if defined(__GNUC__) || defined(__clang__)
  // Rows are contiguous, so the codes are one stream; ask for the bytes
  // kPrefetchAhead further along it (past this row's end: the next rows').
  // The hardware prefetcher alone left the decode waiting on memory (perf:
  // the block loads), as rows of a few hundred bytes start new streams often.
  __builtin_prefetch(rb.row + c * 4 * BITS + kPrefetchAhead, /*read*/ 0, /*keep in all caches*/ 3);
#endif
  const int64_t c_direct = c_end > rb.copied ? rb.copied : c_end;
  for (; c < c_direct; ++c) dot_block(c, rb.row + c * 4 * BITS);
  for (; c < c_end; ++c) dot_block(c, rb.block(c));
  for (int t = 0; t < BT; ++t) {
    const float f = factors[t * x.spans + sp];
    tot_hi[t] = V::fma(tot_hi[t], hi[t], f);
    if constexpr (TERMS == 2) tot_lo[t] = V::fma(tot_lo[t], lo[t], f);
  }
}

// span_dot for spans [0, spans) of BPS whole blocks each, all read in place:
// the block count a constant, so the loop unrolls and the addresses fold
// into the instructions (the general loop's bookkeeping per span and block
// was a large share of the work at G <= 128). Its block and span steps are
// written out rather than shared with span_dot through helpers: that version
// measured 4-7 % slower on AVX2 (same outputs), so the near-copy stays.
template <typename V, int BITS, int BT, int TERMS, int BPS>
inline void full_spans_dot(const RowBlocks<V, BITS>& rb,
                           const typename V::template Decoder<BITS>& dec,
                           const QuantizedActivations& x, int64_t b0, int64_t spans,
                           const float* factors, typename V::FAcc (&tot_hi)[BT],
                           typename V::FAcc (&tot_lo)[BT]) {
  const int64_t stride = x.blocks * 64;
  for (int64_t sp = 0; sp < spans; ++sp) {
    const uint8_t* codes = rb.row + sp * BPS * 4 * BITS;
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(codes + kPrefetchAhead, 0, 3);
#endif
    typename V::IAcc hi[BT], lo[BT];
    for (int t = 0; t < BT; ++t) hi[t] = lo[t] = V::zero_i();
    for (int i = 0; i < BPS; ++i) {
      const typename V::Codes q = dec.decode(codes + i * 4 * BITS);
      for (int t = 0; t < BT; ++t) {
        const int16_t* xb = x.xq + (b0 + t) * stride + (sp * BPS + i) * 64;
        hi[t] = V::madd(hi[t], q, xb);
        if constexpr (TERMS == 2) lo[t] = V::madd(lo[t], q, xb + 32);
      }
    }
    for (int t = 0; t < BT; ++t) {
      const float f = factors[t * x.spans + sp];
      tot_hi[t] = V::fma(tot_hi[t], hi[t], f);
      if constexpr (TERMS == 2) tot_lo[t] = V::fma(tot_lo[t], lo[t], f);
    }
  }
}

// One weight row against BT rows of x starting at b0. The high and low terms
// go to two register accumulators per x row, so no FMA waits on another
// (with G = 32 every block is a span, and one accumulator's FMA latency would
// set the pace).
template <typename V, int BITS, int BT, int TERMS>
inline void gemv_row_tile(const RowBlocks<V, BITS>& rb, const typename V::template Decoder<BITS>& dec,
                          const float* scale, const float* zero, const QuantizedActivations& x,
                          int64_t b0, int64_t n, int64_t N, float* y, float* factors) {
  span_factors<BT>(scale, x, b0, factors);
  typename V::FAcc tot_hi[BT], tot_lo[BT];
  for (int t = 0; t < BT; ++t) tot_hi[t] = tot_lo[t] = V::zero_f();
  // The leading spans whose blocks all exist and are read in place take the
  // unrolled path; the rest (a ragged last span, the copied tail) the general one.
  // (Tiles of four x rows keep the general loop: unrolled, their sixteen
  // accumulators spilled on AVX2, 1.25x slower at batch 4.)
  const int64_t bps = x.span / 32;
  const int64_t whole = BT > 2 ? 0 : (x.blocks < rb.copied ? x.blocks : rb.copied) / bps;
  int64_t sp = 0;
  if constexpr (BT <= 2) switch (bps) {
    case 1: full_spans_dot<V, BITS, BT, TERMS, 1>(rb, dec, x, b0, whole, factors, tot_hi, tot_lo); sp = whole; break;
    case 2: full_spans_dot<V, BITS, BT, TERMS, 2>(rb, dec, x, b0, whole, factors, tot_hi, tot_lo); sp = whole; break;
    case 4: full_spans_dot<V, BITS, BT, TERMS, 4>(rb, dec, x, b0, whole, factors, tot_hi, tot_lo); sp = whole; break;
    default: break;
  }
  for (; sp < x.spans; ++sp)
    span_dot<V, BITS, BT, TERMS>(rb, dec, x, b0, sp, factors, tot_hi, tot_lo);
  for (int t = 0; t < BT; ++t) {
    const float* xsum = x.group_sum + (b0 + t) * x.groups;
    // One horizontal sum per row: the low terms folded in lane by lane first.
    const typename V::FAcc both =
        TERMS == 2 ? V::fma_f(tot_lo[t], 1.f / 32768.f, tot_hi[t]) : tot_hi[t];
    y[(b0 + t) * N + n] = V::hsum(both) - zero_term(scale, zero, xsum, x.groups);
  }
}

// Decoding is the expensive part, so x rows go in tiles of 4 (then 2, 1) that
// share each decoded block; 4 keeps the accumulators in registers on AVX2.
// `params` holds 2 * groups + 4 * spans floats.
template <typename V, int BITS, int TERMS>
void gemv_rows(const LowBitWeight& w, const QuantizedActivations& x, int64_t n_begin,
               int64_t n_end, float* y, float* params) {
  const typename V::template Decoder<BITS> dec;
  float* factors = params + 2 * w.groups;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const RowParams p = row_params(w, n, params, params + w.groups);
    const float* scale = p.scale;
    const float* zero = p.zero;
    const RowBlocks<V, BITS> rb(w.qweight + n * w.words_per_row, x.blocks, n == w.N - 1);
    int64_t b0 = 0;
    for (; b0 + 4 <= x.B; b0 += 4)
      gemv_row_tile<V, BITS, 4, TERMS>(rb, dec, scale, zero, x, b0, n, w.N, y, factors);
    if (b0 + 2 <= x.B) {
      gemv_row_tile<V, BITS, 2, TERMS>(rb, dec, scale, zero, x, b0, n, w.N, y, factors);
      b0 += 2;
    }
    if (b0 < x.B) gemv_row_tile<V, BITS, 1, TERMS>(rb, dec, scale, zero, x, b0, n, w.N, y, factors);
  }
}

template <typename V, int BITS>
void dequantize_rows(const LowBitWeight& w, int64_t n_begin, int64_t n_end, float* out,
                     float* scale_buf, float* zero_buf) {
  const typename V::template Decoder<BITS> dec;
  const int64_t blocks = (w.K + 31) / 32;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const RowParams p = row_params(w, n, scale_buf, zero_buf);
    const float* scale = p.scale;
    const float* zero = p.zero;
    const RowBlocks<V, BITS> rb(w.qweight + n * w.words_per_row, blocks, n == w.N - 1);
    float* o = out + n * w.K;
    for (int64_t c = 0; c < blocks; ++c) {
      const int64_t g = c * 32 / w.G;
      const int64_t rest = w.K - c * 32;
      V::dequantize(dec.decode(rb.block(c)), zero[g], scale[g], o + c * 32,
                    rest < 32 ? static_cast<int>(rest) : 32);
    }
  }
}

// Tiles of output channels small enough that the accumulator slice stays in
// L1 while all k selected residual rows stream through it.
constexpr int64_t kResidualTile = 1024;

template <typename V, int BITS>
void residual_codes_axpy(const ResidualStore& r, const int64_t* channels, const float* alpha,
                         int64_t k, int64_t n_begin, int64_t n_end, float* acc) {
  const typename V::template Decoder<BITS> dec;
  const int64_t row_blocks = r.words_per_row / BITS;
  for (int64_t t0 = n_begin; t0 < n_end; t0 += kResidualTile) {
    const int64_t t1 = t0 + kResidualTile < n_end ? t0 + kResidualTile : n_end;
    const int64_t c0 = t0 / 32, c1 = (t1 + 31) / 32;
    for (int64_t i = 0; i < k; ++i) {
      const uint32_t* words = r.residual + channels[i] * r.words_per_row;
      const float a = alpha[i];
#if defined(__GNUC__) || defined(__clang__)
      // The selected rows lie anywhere in the store: fetch the next one's
      // slice of this tile while this one is decoded.
      if (i + 1 < k) {
        const uint8_t* next = reinterpret_cast<const uint8_t*>(r.residual + channels[i + 1] * r.words_per_row);
        for (int64_t byte = c0 * 4 * BITS; byte < c1 * 4 * BITS; byte += 64)
          __builtin_prefetch(next + byte, 0, 3);
      }
#endif
      if (channels[i] == r.K - 1) {  // the store's last row: its end may need the copy
        const RowBlocks<V, BITS> rb(words, row_blocks, /*last_row=*/true);
        for (int64_t c = c0; c < c1; ++c) V::axpy(dec.decode(rb.block(c)), a, acc + c * 32);
      } else {
        const uint8_t* row = reinterpret_cast<const uint8_t*>(words);
        for (int64_t c = c0; c < c1; ++c) V::axpy(dec.decode(row + c * 4 * BITS), a, acc + c * 32);
      }
    }
  }
}

// Run-time bit width -> the templates above (a switch, as bitpack.h's
// dispatch_bits, which this file cannot include: see the top).
template <typename F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    case 4: f.template operator()<4>(); break;
    case 5: f.template operator()<5>(); break;
    case 6: f.template operator()<6>(); break;
    case 7: f.template operator()<7>(); break;
    case 8: f.template operator()<8>(); break;
    default: break;
  }
}

// Per-thread scratch for the row parameters, grown when needed and kept:
// a decode step calls the GEMV hundreds of times (SmolLM2: 210 linears of
// ~20 us each), and an allocation per call and thread is avoidable work.
inline float* row_scratch(int64_t floats) {
  thread_local float* buf = nullptr;
  thread_local int64_t cap = 0;
  thread_local struct Release {
    float** p;
    ~Release() { delete[] *p; }
  } release{&buf};
  if (floats > cap) {
    delete[] buf;
    buf = new float[floats];
    cap = floats;
  }
  return buf;
}

template <typename V>
void gemv_entry(const LowBitWeight& w, const QuantizedActivations& x, int64_t n0, int64_t n1,
                float* y) {
  // Row parameters in float32 (scales, zeros) and span factors, reused for every row.
  float* params = row_scratch(2 * w.groups + 4 * x.spans);
  with_bits(w.bits, [&]<int BITS>() {
    if (x.terms == 1)
      gemv_rows<V, BITS, 1>(w, x, n0, n1, y, params);
    else
      gemv_rows<V, BITS, 2>(w, x, n0, n1, y, params);
  });
}

template <typename V>
void dequantize_entry(const LowBitWeight& w, int64_t n0, int64_t n1, float* out) {
  float* params = row_scratch(2 * w.groups);
  with_bits(w.bits, [&]<int BITS>() { dequantize_rows<V, BITS>(w, n0, n1, out, params, params + w.groups); });
}

template <typename V>
void residual_entry(const ResidualStore& r, const int64_t* channels, const float* alpha, int64_t k,
                    int64_t n0, int64_t n1, float* acc) {
  with_bits(r.bits, [&]<int BITS>() { residual_codes_axpy<V, BITS>(r, channels, alpha, k, n0, n1, acc); });
}

template <typename V>
constexpr DecodeKernels make_kernels() {
  return DecodeKernels{&gemv_entry<V>, &dequantize_entry<V>, &residual_entry<V>};
}
