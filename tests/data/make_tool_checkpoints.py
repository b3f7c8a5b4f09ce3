"""Regenerate the real-tool checkpoints under tests/data/tools/ (issue 17, item 3).

The files are written by the quantization tools themselves, so the project's readers
are checked against what the tools really write rather than against layouts taken
from their docs. Each tool runs in its own throw-away environment (they pin
conflicting transformers versions); CI only reads the committed files and never
needs the tools.

Steps (each is one run of this script, in the environment named)::

    python make_tool_checkpoints.py base          # project venv: tiny random Llama
    python make_tool_checkpoints.py autoawq       # venv with autoawq
    python make_tool_checkpoints.py gptqmodel     # venv with gptqmodel
    python make_tool_checkpoints.py llmcompressor # venv with llmcompressor

Output, under ``tests/data/tools/``:

* ``tiny-llama/``: the fp16 reference model (``save_pretrained``) with a
  character-level tokenizer, 2 decoder layers, hidden 128, MLP 256.
* ``<tool>-<variant>/``: the tool's checkpoint directory as it saved it, plus
  ``expected.safetensors`` with the tool's own view of it: ``logits`` of its own
  quantized model on ``input_ids`` (also stored) and, for the first decoder
  layer's linears, ``<linear>.weight``: the weight its own kernel/dequantizer
  multiplies with (``[N, K]``, in the tool's dtype).

All tools run on CPU. Seeds are fixed, but the tools' own numerics may change
across versions: the versions used are recorded in ``<dir>/tool_versions.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent / "tools"
BASE = HERE / "tiny-llama"
SEED = 0
# A fixed English-ish calibration text: the tools only need a few hundred tokens.
CALIB = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Quantization maps each weight to a small integer code and a shared scale.",
    "A residual store keeps the part of the weight that the codes could not hold.",
    "In 1889 the tower was finished for the World's Fair in Paris, France.",
    "Large language models run in memory; fewer bits per weight make them faster.",
    "She sells sea shells by the sea shore, and the shells she sells are surely real.",
    "Numbers like 3.14159 and 2.71828 appear everywhere in science and engineering.",
    "The committee met on Tuesday to decide the budget for the next fiscal year.",
] * 4
# Only these linears' dequantized weights are stored in expected.safetensors:
# one of each shape the tiny model has (square, a narrow k/v output, the MLP's
# wider input: one to four groups of 64), to keep the committed files small.
EXPECTED_WEIGHTS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                    "model.layers.0.mlp.down_proj")
# A plain chat template (the messages' text, then the generation prompt).
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
EVAL_TEXT = "The tower was built in Paris for the fair."


def _versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def _save_expected(out: Path, logits: torch.Tensor, input_ids: torch.Tensor,
                   weights: dict[str, torch.Tensor], versions: dict) -> None:
    from safetensors.torch import save_file

    tensors = {"logits": logits.float().contiguous(), "input_ids": input_ids.contiguous()}
    # Three of the first decoder layer's weights, in the tool's own dtype (the
    # logits cover the rest).
    tensors.update({f"{k}.weight": v.contiguous() for k, v in weights.items()
                    if k in EXPECTED_WEIGHTS})
    save_file(tensors, str(out / "expected.safetensors"))
    (out / "tool_versions.json").write_text(json.dumps(versions, indent=1) + "\n")


def _input_ids(tokenizer) -> torch.Tensor:
    return tokenizer(EVAL_TEXT, return_tensors="pt").input_ids


def make_base() -> None:
    """The tiny fp16 Llama and a character-level fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(set("".join(CALIB) + EVAL_TEXT))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    assert len(vocab) <= config.vocab_size, len(vocab)
    model = LlamaForCausalLM(config)
    # Weights like a trained model's scale (std 0.02 is the init; make the
    # per-channel magnitudes uneven so AWQ's scale search has something to find).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "proj" in name:
                p.mul_(torch.exp(torch.randn(p.shape[1]) * 0.5))
    model = model.half()
    if BASE.exists():
        shutil.rmtree(BASE)
    model.save_pretrained(BASE)
    fast.save_pretrained(BASE)
    # transformers 5 records its new "TokenizersBackend" class, which the 4.x
    # that AutoAWQ pins does not know; the fast tokenizer class loads in both.
    tcfg_path = BASE / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg["chat_template"] = CHAT_TEMPLATE  # for qdec generate's chat prompt
    tcfg_path.write_text(json.dumps(tcfg, indent=2) + "\n")
    ids = _input_ids(fast)
    with torch.no_grad():
        logits = model.float()(ids).logits[0]
    _save_expected(BASE, logits, ids, {}, _versions("torch", "transformers"))


def make_autoawq() -> None:
    """AutoAWQ GEMM 4-bit g64, zero point; and the same run with
    ``export_compatible=True`` (scales and clipping applied, weights left in fp16): the
    reference in the quantized model's basis that ``qdec residual`` needs."""
    import awq.modules.linear.gemm as awq_gemm
    from awq import AutoAWQForCausalLM
    from awq.utils.packing_utils import dequantize_gemm
    from transformers import AutoTokenizer

    # With triton importable, WQLinear_GEMM takes its triton path even on CPU (and
    # fails on torch.cuda); without it, the torch fallback (dequantize_gemm, matmul).
    awq_gemm.TRITON_AVAILABLE = False
    tok = AutoTokenizer.from_pretrained(BASE)
    cfg = {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}
    for export_compatible in (True, False):
        out = HERE / ("autoawq-gemm-w4g64" + ("-reference" if export_compatible else ""))
        model = AutoAWQForCausalLM.from_pretrained(str(BASE), torch_dtype=torch.float16,
                                                   device_map="cpu")
        # Char-level tokens: the calibration lines are ~80 tokens; AutoAWQ drops
        # lines longer than max_calib_seq_len.
        model.quantize(tok, quant_config=cfg, calib_data=CALIB, max_calib_samples=len(CALIB),
                       max_calib_seq_len=128, n_parallel_calib_samples=None,
                       export_compatible=export_compatible)
        if out.exists():
            shutil.rmtree(out)
        model.save_quantized(str(out))
        tok.save_pretrained(str(out))
        if export_compatible:
            # Float weights: the AWQ quantization_config save_quantized wrote would
            # make loaders treat the directory as packed.
            cfg_path = out / "config.json"
            hf = json.loads(cfg_path.read_text())
            hf.pop("quantization_config", None)
            cfg_path.write_text(json.dumps(hf, indent=2) + "\n")
            continue
        # from_quantized on CPU insists on the 'ipex' kernel (intel_extension_for_
        # pytorch); the model quantized in memory holds the same WQLinear_GEMM modules.
        weights = {}
        for name, mod in model.model.named_modules():
            if hasattr(mod, "qweight") and hasattr(mod, "qzeros"):
                weights[name] = dequantize_gemm(mod.qweight, mod.qzeros, mod.scales, mod.w_bit,
                                                mod.group_size).t()
        ids = _input_ids(tok)
        with torch.no_grad():
            logits = model.model(ids).logits[0]
        _save_expected(out, logits, ids, weights,
                       _versions("autoawq", "torch", "transformers"))


def make_gptqmodel() -> None:
    """GPTQModel 4- and 3-bit g64, with and without desc_act (act-order)."""
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE)
    calib = [{"input_ids": tok(t).input_ids, "attention_mask": [1] * len(tok(t).input_ids)}
             for t in CALIB]
    for bits in (4, 3):
        for desc_act in (False, True):
            out = HERE / f"gptqmodel-w{bits}g64{'-act' if desc_act else ''}"
            qcfg = QuantizeConfig(bits=bits, group_size=64, desc_act=desc_act, sym=True)
            # dtype pinned: on CPU GPTQModel would pick bfloat16, and the expected
            # weights/logits should be the float16 ones its kernels use on GPUs.
            model = GPTQModel.load(str(BASE), qcfg, device="cpu", dtype=torch.float16)
            model.quantize(calib, batch_size=1)
            if out.exists():
                shutil.rmtree(out)
            model.save(str(out))
            del model
            qmodel = GPTQModel.load(str(out), device="cpu", dtype=torch.float16)
            weights = {}
            for name, mod in qmodel.model.named_modules():
                if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
                    weights[name] = mod.dequantize_weight().t()
            ids = _input_ids(tok)
            with torch.no_grad():
                logits = qmodel.model(ids).logits[0]
            _save_expected(out, logits, ids, weights,
                           _versions("gptqmodel", "torch", "transformers"))


def make_llmcompressor() -> None:
    """llm-compressor W4A16 (int4 weight-only, group 64) with its GPTQ and AWQ
    modifiers; written in the compressed-tensors pack-quantized format."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    if not torch.cuda.is_available():
        # The AWQ modifier pins its cached activations for faster host-to-device
        # copies; pin_memory needs an accelerator. On CPU there is nothing to copy.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    tok = AutoTokenizer.from_pretrained(BASE)
    ds = Dataset.from_dict({"text": CALIB})
    ds = ds.map(lambda r: tok(r["text"]), remove_columns=["text"])
    scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
              "symmetric": False, "strategy": "group", "group_size": 64}}
    only = os.environ.get("QDEC_LLMC_ONLY")  # regenerate one variant
    for label, make_recipe in (
            ("gptq", lambda: GPTQModifier(config_groups={"group_0": scheme},
                                          ignore=["lm_head"])),
            # actorder="group" (g_idx) is refused by llm-compressor 0.14; "weight"
            # reorders during GPTQ only, so the file has no g_idx.
            ("gptq-w8-sym-channel", lambda: GPTQModifier(
                config_groups={"group_0": {**scheme, "weights": {
                    "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                    "actorder": "weight"}}},
                ignore=["lm_head"])),
            ("awq", lambda: AWQModifier(config_groups={"group_0": scheme},
                                        ignore=["lm_head"]))):
        if only and label != only:
            continue
        out = HERE / f"llmcompressor-w4a16-{label}"
        model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float16)
        try:
            oneshot(model=model, dataset=ds, recipe=make_recipe(),
                    max_seq_length=64, num_calibration_samples=len(CALIB))
        except Exception as e:  # noqa: BLE001 - recorded, the other variants still run
            print(f"llmcompressor {label} failed: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc()
            continue
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out, save_compressed=True)
        tok.save_pretrained(out)
        # transformers' compressed-tensors integration, decompressing on load: the
        # dense weights are the library's own dequantization.
        dense = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float16,
            quantization_config=CompressedTensorsConfig(run_compressed=False))
        weights = {name: mod.weight.detach() for name, mod in dense.named_modules()
                   if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.")}
        ids = _input_ids(tok)
        with torch.no_grad():
            logits = dense(ids).logits[0]
        _save_expected(out, logits, ids, weights,
                       _versions("llmcompressor", "compressed-tensors", "torch",
                                 "transformers"))


STEPS = {"base": make_base, "autoawq": make_autoawq, "gptqmodel": make_gptqmodel,
         "llmcompressor": make_llmcompressor}

if __name__ == "__main__":
    # GPTQModel's loader pool wants 2 CPU workers; its default is half the cores.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    if len(sys.argv) != 2 or sys.argv[1] not in STEPS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(STEPS)}}}")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    STEPS[sys.argv[1]]()
