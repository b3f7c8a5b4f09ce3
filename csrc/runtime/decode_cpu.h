// The non-GEMV arithmetic of one float32 CPU decode step (one new token),
// on raw buffers the caller owns: RMSNorm, rotate-half RoPE, attention of one
// query over the KV cache (GQA), SwiGLU and the residual add. LlamaModel's
// CPU decode path (model.cpp) calls these instead of ~50 small ATen ops per
// layer, whose dispatch and allocation cost more than the arithmetic at a
// hidden size of a few hundred; each computes what the ATen path computes,
// in a different float32 summation order (tests: tests/cpp/test_runtime_decode.cpp).
//
// Loops are written so the compiler vectorizes them (independent
// accumulators for the reductions; no aliasing between inputs and outputs
// except where stated).
#pragma once

#include <cstdint>

namespace qdec::runtime::decode_cpu {

// out[i] = w[i] * (x[i] * rsqrt(mean(x^2) + eps)), transformers' LlamaRMSNorm
// for float32 (weight applied after normalising). out may alias x.
void rms_norm(const float* x, const float* w, int64_t n, double eps, float* out);

// Rotate-half RoPE in place on `heads` consecutive vectors of head_dim
// values: for i < d/2, (a, b) = (x[i], x[i + d/2]) becomes
// (a·cos[i] − b·sin[i], b·cos[i + d/2] + a·sin[i + d/2]); cos/sin hold head_dim
// values (the position's row of the table).
void rope(float* x, const float* cos, const float* sin, int64_t heads, int64_t head_dim);

// Attention of one query position over `len` cached positions.
//   q      [num_heads, head_dim]
//   keys   [num_kv_heads, capacity, head_dim] (positions 0..len-1 used), values alike
//   scores scratch of num_heads * len floats
//   out    [num_heads, head_dim]
// Query head h reads KV head h / (num_heads / num_kv_heads), as
// scaled_dot_product_attention(enable_gqa=True). Parallel over heads with
// at::parallel_for when the work is large enough to pay for it.
void attend(const float* q, const float* keys, const float* values, int64_t num_heads,
            int64_t num_kv_heads, int64_t head_dim, int64_t capacity, int64_t len, double scale,
            float* scores, float* out);

// gate[i] = silu(gate[i]) * up[i] (SwiGLU), in place on gate.
void silu_mul(float* gate, const float* up, int64_t n);

// acc[i] += x[i].
void add_inplace(float* acc, const float* x, int64_t n);

}  // namespace qdec::runtime::decode_cpu
