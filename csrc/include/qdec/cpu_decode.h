// Torch-free interface of the CPU decode path: the low-bit GEMV, the residual
// compensation and the dequantize, each built once per instruction-set level
// (portable C++, AVX2, AVX-512) and chosen at run time.
//
// Where each piece lives:
//   csrc/ops/cpu/kernels/isa.cpp          CPU feature detection, QDEC_CPU_ISA,
//                                         the per-level function table
//   csrc/ops/cpu/kernels/activations.cpp  x -> int16 blocks (below), portable
//   csrc/ops/cpu/kernels/decode_scalar.cpp / decode_avx2.cpp / decode_avx512.cpp
//                                         the kernels, one file per level
//
// ---------------------------------------------------------------- the math
// A weight row is w_k = s_g (q_k - z_g) with q the packed codes (bitpack.h),
// so   y = sum_g s_g (sum_{k in g} q_k x_k  -  z_g X_g),   X_g = sum_{k in g} x_k.
// The inner sums run in integers: x is split once per call, per "span" of S
// consecutive inputs (S = 128, or 32/64 when the group size G is not a
// multiple of 128), into two int16 terms with one float scale d per span:
//   x_k ~ d * (hi_k + lo_k / 32768),  d = max_span|x| / 32767,
//   hi_k = round(x_k / d), lo_k = round((x_k - d hi_k) * 32768 / d).
// Codes (< 256) times int16 fit the 16x16->32-bit multiply-add instructions
// (vpmaddwd) exactly, and a span's integer sums cannot overflow int32
// (128 * 255 * 32767 < 2^31). Per span the kernel adds
// (s_g d) * (sum q hi + sum q lo / 32768) in float32, and per row subtracts
// sum_g s_g z_g X_g with X_g summed from the same represented x, so the result
// is exactly sum_k w_k x^_k with |x_k - x^_k| <= d / 65536 ~ max_span|x| * 4.7e-10:
// per output  |y - y_exact| <= max|x| * 4.7e-10 * sum_k |w_k|  plus float32
// rounding of the sums, i.e. float-grade. (One int16 term alone, llama.cpp's
// approach with int8, leaves d/2: with LLM activation outliers, |x| in the
// hundreds beside O(1) values, that is ~1e-2 of a typical input, enough to flip
// near-tied outlier selections between two runs that differ only in float
// summation order.) tests/python/test_cpu_isa.py checks the bound for every
// level, bit width and group size.
//
// Activation precision (QDEC_CPU_ACTIVATIONS, set_activation_precision):
//   int16x2  (default) the two terms above: float-grade, |x - x^| <= d / 65536;
//   int16    the high term only: |x - x^| <= d / 2 = max_span|x| / 65534.
// int16 halves the integer multiply-adds and, at G = 32, the per-span
// converts and FMAs (the decode's bound: cpu_decode.h's "why integers" and
// decode_loops.h), for an error still 64x below llama.cpp's int8 blocks and
// of the order of bfloat16 activations (2^-9 of each value) when a span holds
// no outlier. The cost is the flips above: near-tied outlier selections can
// differ from the float reference, so bit-exact parity tests use int16x2.
//
// Why integers: decoding a code to float costs a widening, a convert and an
// FMA per value; with int16 x a 16-bit lane feeds vpmaddwd directly, so two
// multiply-adds per 16 codes replace four conversions and two FMAs, and
// 2- and 3-bit weights stay as cheap per value as 4-bit ones.
#pragma once

#include <cstdint>

namespace qdec::cpu {

// Instruction-set levels, slowest to fastest. AVX-512 here means
// F + BW + VL + VBMI + VNNI (Intel Ice Lake and newer, AMD Zen 4 and newer):
// VBMI's byte permute decodes a whole 32-value block in one instruction, VNNI
// fuses the int16 multiply-add with the accumulation.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Element type of scales and zeros as stored (they follow x's dtype).
enum class ParamType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A packed base weight W[N, K] (layout: bitpack.h).
struct LowBitWeight {
  const uint32_t* qweight;  // [N, words_per_row]
  const void* scales;       // [N, groups] of `param_type`
  const void* zeros;        // [N, groups] of `param_type`, or nullptr (symmetric)
  ParamType param_type;
  int bits;
  int64_t N, K, G, groups, words_per_row;
};

// How x is represented for the integer dot products (see above).
enum class ActivationPrecision : int { kInt16x2 = 0, kInt16 = 1 };

// The precision in use: QDEC_CPU_ACTIVATIONS (int16x2 | int16, default
// int16x2) when first asked, or set_activation_precision's.
ActivationPrecision activation_precision();
void set_activation_precision(ActivationPrecision precision);
const char* activation_precision_name(ActivationPrecision precision);
// Parses "int16x2" | "int16"; throws std::invalid_argument naming the
// accepted values otherwise.
ActivationPrecision parse_activation_precision(const char* name);

// x[B, K] prepared for the integer dot products (see the math above).
struct QuantizedActivations {
  const int16_t* xq;       // [B, blocks, 2, 32]: per block 32 high then 32 low terms, zero past K
                           // (the low terms are all zero when terms == 1)
  const float* span_scale; // [B, spans]: d of each span
  const float* group_sum;  // [B, groups]: X_g of the quantized x
  int64_t B, blocks, span, spans, spans_per_group, groups;
  int terms;               // 2 (int16x2) or 1 (int16: the kernels may skip the low terms)
};

// Span length for a weight geometry: the largest of 128/64/32 that divides
// the group size (any, when there is one group per row).
int64_t activation_span(int64_t G, int64_t groups);

// Sizes of the buffers quantize_activations fills.
inline int64_t activation_blocks(int64_t K) { return (K + 31) / 32; }
inline int64_t activation_spans(int64_t K, int64_t span) {
  return (activation_blocks(K) * 32 + span - 1) / span;
}

// Fills xq [B, blocks*64], span_scale [B, spans], group_sum [B, groups] from
// float32 x [B, K] (row-major) at activation_precision() and returns the
// view of them. A span holding a
// NaN or infinity gets a NaN scale, so every output it touches is NaN, as in
// float arithmetic.
QuantizedActivations quantize_activations(const float* x, int64_t B, int64_t K, int64_t G,
                                          int64_t groups, int16_t* xq, float* span_scale,
                                          float* group_sum);

// A residual store R^T[K, N] (rows = input channels), symmetric codes of
// `bits` with one float32 scale per output n.
struct ResidualStore {
  const uint32_t* residual;  // [K, words_per_row]
  const float* scales;       // [N]
  int bits;
  int64_t K, N, words_per_row;
};

// The kernels of one instruction-set level. Every function works on a
// half-open range so the ATen glue can split it over threads.
struct DecodeKernels {
  // y[b, n] = sum_k x[b, k] W[n, k] for n in [n_begin, n_end), b < B; y is
  // float32 [B, N].
  void (*gemv)(const LowBitWeight& w, const QuantizedActivations& x, int64_t n_begin,
               int64_t n_end, float* y);
  // Dense float32 W[n, :] for n in [n_begin, n_end) into out[N, K]; the same
  // float operations as qdec.reference.dequantize_ref: (q - z) * s.
  void (*dequantize)(const LowBitWeight& w, int64_t n_begin, int64_t n_end, float* out);
  // acc[n] += sum_i alpha[i] * q[channels[i], n] for n in [n_begin, n_end)
  // (n_begin a multiple of 32): the undecoded compensation sum; the caller
  // finishes y[n] += scale[n] * (acc[n] - 2^(bits-1) * sum_i alpha[i]).
  // SIMD levels update whole 32-value blocks, so acc must hold
  // ceil(N / 32) * 32 floats (the values past N stay unused).
  void (*residual_codes_axpy)(const ResidualStore& r, const int64_t* channels,
                              const float* alpha, int64_t k, int64_t n_begin, int64_t n_end,
                              float* acc);
};

// The level in use: QDEC_CPU_ISA (scalar | avx2 | avx512 | auto, default
// auto = the best this CPU has) when first asked, or set_isa's.
Isa active_isa();
// The best level this CPU and this build support.
Isa best_isa();
// Forces a level for the whole process. Throws std::runtime_error naming the
// missing CPU features when the CPU cannot run it.
void set_isa(Isa level);
const char* isa_name(Isa level);
// Parses "scalar" | "avx2" | "avx512" | "auto" (auto = best_isa()); throws
// std::invalid_argument naming the accepted values otherwise.
Isa parse_isa(const char* name);
const DecodeKernels& decode_kernels();  // of active_isa()

// The per-level tables (defined in decode_<level>.cpp).
namespace scalar { extern const DecodeKernels kKernels; }
namespace avx2 { extern const DecodeKernels kKernels; }
namespace avx512 { extern const DecodeKernels kKernels; }

// Converts row n's scales (and zeros; symmetric rows get 2^(bits-1)) to
// float32. Shared by every level: it runs once per row, outside the hot loop.
void load_row_params(const LowBitWeight& w, int64_t n, float* scale, float* zero);

// Row n's scales and zeros as float32 without a copy where none is needed:
// float32 parameters are read in place (a per-row memcpy of them was ~7 % of
// a SmolLM2 decode step), others are converted into scale_buf / zero_buf
// (load_row_params), and symmetric rows get 2^(bits-1) in zero_buf.
struct RowParams {
  const float* scale;
  const float* zero;
};
RowParams row_params(const LowBitWeight& w, int64_t n, float* scale_buf, float* zero_buf);

}  // namespace qdec::cpu
