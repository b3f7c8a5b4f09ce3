// Quantized checkpoints written by other tools, read by qdec_infer directly:
//   AutoAWQ GEMM                    quant_method "awq"  (qdec/formats/autoawq.py)
//   GPTQ (AutoGPTQ, GPTQModel, ...) quant_method "gptq" or a quantize_config.json
//                                   (qdec/formats/gptq.py)
//   compressed-tensors              quant_method "compressed-tensors", format
//   pack-quantized (llm-compressor) "pack-quantized" (qdec/formats/compressed_tensors.py)
// Every quantized linear is converted at load into the QDEC layout the
// kernels read (checkpoint.h, qdec/bitpack.h): codes packed per output row,
// scales [N, groups] in the file's float dtype, zeros as floats (or none:
// symmetric), and for act-order layers an input permutation.
//
// The Python readers are the reference: same layouts, same checks, their
// messages where they have one, and the converted tensors are exactly the
// ones they produce (PackedWeight: qweight, scales, zeros, input_permutation),
// so qdec_infer and `qdec generate DIR` run the same model. Such a directory
// has no residual store (it needs the original weights), so it runs at k = 0;
// `qdec residual --quantized DIR --reference DIR --out DIR` adds one.
//
// Act-order (GPTQ desc_act / compressed-tensors weight_g_idx: g_idx is not
// k // G) becomes an input permutation, as in the Python readers: the input
// channels are stably sorted by group so that groups are contiguous runs of G
// again, and the layer gathers x in that order (Linear::input_perm). Nothing
// is dequantized, so the layer still runs the low-bit kernels.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint.h"
#include "safetensors.h"

namespace qdec::runtime {

enum class ForeignFormat { None, AutoAWQ, GPTQ, CompressedTensors };

// One quantized linear in the QDEC layout.
struct ConvertedLinear {
  QuantLayerMeta meta;
  at::Tensor qweight;                    // int32 [N, ceil(K/32) * bits]
  at::Tensor scales;                     // [N, ceil(K/G)], F16 / BF16 / F32 as stored
  std::optional<at::Tensor> zeros;       // like scales; none: symmetric, z = 2^(bits-1)
  std::optional<at::Tensor> input_perm;  // int64 [K]: column j multiplies input perm[j]
};

struct ForeignCheckpoint {
  ForeignFormat kind = ForeignFormat::None;
  std::string format;  // as the Python reader records it: autoawq-gemm, gptq-v1, gptq-v2, compressed-tensors
  std::map<std::string, ConvertedLinear> linears;
  std::vector<std::string> notes;  // for the user (e.g. GPTQ zeros read as v1 by default)
};

// The tool that wrote a directory, from its config.json (already parsed) and
// files, as qdec.formats.foreign.detect_quantized_format: a "qdec" section
// means a QDEC checkpoint (None).
ForeignFormat detect_foreign_format(const nlohmann::json& config, const std::string& dir);
// "AutoAWQ", "GPTQ", "compressed-tensors" (the names `qdec generate` prints).
const char* foreign_tool_name(ForeignFormat kind);

// Reads the quantization config and converts every quantized linear of
// `weights` (the directory's model file). `config_path` names config.json in
// errors. Throws LoadError naming the file, the tensor, and what was expected.
ForeignCheckpoint read_foreign_checkpoint(ForeignFormat kind, const std::string& dir,
                                          const nlohmann::json& config, const std::string& config_path,
                                          const SafetensorsFile& weights);

// What qdec_infer says on such a directory: k = 0, and how to add a residual
// store (the words of `qdec generate DIR`).
std::string foreign_k0_message(const std::string& dir, ForeignFormat kind);

// ---- building blocks (exposed for the tests) --------------------------------

// Codes packed densely along each row, value i at bit bits*i of the row's
// little-endian bit string (GPTQ qweight/qzeros after transposing to rows,
// compressed-tensors weight_packed / weight_zero_point): int32 [rows, W] ->
// uint8 [rows, cols]. Needs W * 32 >= cols * bits.
at::Tensor unpack_dense_rows(const at::Tensor& words, int bits, int64_t cols);
// uint8 codes [rows, cols] -> the QDEC packed layout int32 [rows, ceil(cols/32) * bits]
// (the same bit order, each row padded with zero codes to whole 32-value blocks).
at::Tensor pack_qdec_rows(const at::Tensor& codes, int bits);
// AutoAWQ's 4-bit words, nibble i of word c holding column 8c + [0,2,4,6,1,3,5,7][i]:
// int32 [rows, W] -> uint8 [rows, 8W].
at::Tensor unpack_awq_rows(const at::Tensor& words);
// qdec.formats.gptq.act_order_permutation: none when g_idx is absent or
// k // G; else the channels stably sorted by group (int64 [K]). `file` and
// `tensor` name g_idx in errors (a g_idx whose groups do not hold exactly
// the contiguous layout's channel counts cannot be permuted and is refused).
std::optional<at::Tensor> act_order_permutation(const std::optional<at::Tensor>& g_idx, int64_t K, int64_t G,
                                                const std::string& file, const std::string& tensor);

}  // namespace qdec::runtime
