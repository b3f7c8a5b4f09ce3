"""The ``qdec`` command line as a new user meets it: every bad argument fails
before a model is loaded, naming its flag; one ``--k`` rule; defaults in every
``--help``; the shipped WikiText-2 excerpts as the default texts."""

from __future__ import annotations

import argparse
import json
import ast
import re
from pathlib import Path

import pytest

import qdec.cli as cli
import qdec.eval.sweep as sweep
import qdec.models.llama as llama
import qdec.patch as patch_mod
from qdec import cli_args
from qdec.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_model(monkeypatch):
    """Every way a command loads a model or starts work fails the test."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for module, name in ((llama, "load_gguf_llama"), (cli, "load_model"),
                         (sweep, "run_eval"), (patch_mod, "load_patched_checkpoint")):
        monkeypatch.setattr(module, name, loaded)
    import qdec.quant.streaming as streaming
    import qdec.tune as tune

    monkeypatch.setattr(streaming, "quantize_checkpoint_streaming", loaded)
    monkeypatch.setattr(tune, "measure", loaded)


def parse_error(capsys, argv: list[str]) -> str:
    """argparse's refusal (exit status 2) of ``argv``; returns its stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def command_error(capsys, argv: list[str]) -> str:
    """A command's own refusal (return value 2) of ``argv``; returns its stderr."""
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, flag, message", [
    (["eval", "--variants", "rtn:9:128"], "--variants", "'rtn:9:128': bits must be in 2..8, got 9"),
    (["eval", "--variants", "rtn:3:128,foo:3:128"], "--variants", "method 'foo' is not one of"),
    (["eval", "--variants", "awq:3:100"], "--variants", "positive multiple of 32"),
    (["eval", "--variants", "awq:3"], "--variants", "method:bits:group"),
    (["eval", "--variants", "awq:x:128"], "--variants", "'x' is not an integer"),
    (["eval", "--policies", "dynamik"], "--policies",
     "unknown policy 'dynamik'; choose from dynamic"),
    (["eval", "--fractions", "abc"], "--fractions", "'abc' is not a number"),
    (["eval", "--fractions", "0.01,1.5"], "--fractions", "'1.5' is not a fraction in [0, 1]"),
    (["eval", "--cost-fractions", "-0.1"], "--cost-fractions", "not a fraction"),
    (["eval", "--ranks", "8,zero"], "--ranks", "'zero' is not an integer >= 1"),
    (["eval", "--lowrank-methods", "svd"], "--lowrank-methods", "unknown low-rank method 'svd'"),
    (["eval", "--tune-targets", "fast"], "--tune-targets", "not a number or percentage"),
    (["eval", "--tune-targets=-5%"], "--tune-targets", "slowdown > 0"),
    (["eval", "--seq-len", "0"], "--seq-len", "integer >= 2"),
    (["eval", "--max-windows", "0"], "--max-windows", "integer >= 1"),
    (["eval", "--residual-bits", "0"], "--residual-bits", "residual bits must be 2..8"),
    (["eval", "--calib-samples", "many"], "--calib-samples", "'many' is not an integer"),
    (["generate", "ckpt", "--k", "2.0"], "--k", "k as a fraction must be in [0, 1], got '2.0'"),
    (["generate", "ckpt", "--k", "-3"], "--k", "k must be a count of input channels"),
    (["generate", "ckpt", "--k", "lots"], "--k", "got 'lots'"),
    (["generate", "ckpt", "--max-new-tokens", "0"], "--max-new-tokens", "integer >= 1"),
    (["generate", "ckpt", "--temperature", "-1"], "--temperature", "finite number >= 0"),
    (["quantize", "--out", "x", "--bits", "9"], "--bits", "bits must be in 2..8"),
    (["quantize", "--out", "x", "--group-size", "100"], "--group-size", "multiple of 32"),
    (["quantize", "--out", "x", "--residual-bits", "1"], "--residual-bits", "or 0 for no residual"),
    (["quantize", "--out", "x", "--method", "hqq"], "--method", "invalid choice: 'hqq'"),
    (["tune", "--targets", "2.5%,soon"], "--targets", "'soon' is not a number or percentage"),
    (["tune", "--sm-budgets", "0,-4"], "--sm-budgets", "'-4' is not an integer >= 0"),
    (["tune", "--shapes", "llama-70b"], "--shapes", "invalid choice: 'llama-70b'"),
    (["demo", "--bits", "1"], "--bits", "bits must be in 2..8, got 1"),
])
def test_bad_value_refused_while_parsing(no_model, capsys, argv, flag, message):
    err = parse_error(capsys, argv)
    assert f"argument {flag}" in err
    assert message in err


def test_paths_and_outputs_checked_before_loading(no_model, capsys, tmp_path):
    missing = tmp_path / "missing.txt"
    err = command_error(capsys, ["eval", "--text", str(missing)])
    # ... saying how to point at the full file
    assert f"--text {missing}: not found" in err and "wiki.test.raw" in err
    err = command_error(capsys, ["eval", "--calib", str(missing)])
    assert f"--calib {missing}: not found" in err and "wikitext-2/valid.txt" in err
    err = command_error(capsys, ["eval", "--text", str(tmp_path)])
    assert "--text" in err and "is a directory" in err
    err = command_error(capsys, ["eval", "--model", str(tmp_path / "m.gguf")])
    assert "--model" in err and "no such file" in err
    err = command_error(capsys, ["eval", "--model", str(tmp_path)])
    assert "--model" in err and "without config.json" in err
    err = command_error(capsys, ["eval", "--out", str(tmp_path)])
    assert f"--out {tmp_path}: is a directory" in err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    err = command_error(capsys, ["eval", "--out", str(a_file / "sub" / "eval.json")])
    assert "--out" in err and "is a file" in err
    err = command_error(capsys, ["eval", "--tune-config", str(missing)])
    assert "tune config" in err and "does not exist" in err

    out = tmp_path / "ckpt"
    out.mkdir()
    err = command_error(capsys, ["quantize", "--out", str(out)])
    assert f"--out {out}: exists; pass --overwrite" in err
    err = command_error(capsys, ["quantize", "--out", str(tmp_path / "new"), "--calib",
                                 str(missing)])
    assert f"--calib {missing}: not found" in err
    err = command_error(capsys, ["quantize", "--out", str(tmp_path / "new"), "--model",
                                 str(missing)])
    assert "--model" in err and "no such file" in err
    assert not (tmp_path / "new").exists()  # nothing half-written

    err = command_error(capsys, ["report", str(missing), "--out", str(tmp_path / "rep")])
    assert f"results {missing}: not found" in err
    err = command_error(capsys, ["tune", "--device", "cpu", "--weights", "mlp=2"])
    assert "unknown projections ['mlp']" in err


def qdec_config(path: Path, residual_bits: int | None) -> Path:
    """A directory with just a QDEC config.json: all ``qdec generate`` reads
    before it loads the model."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "qdec": {"format_version": 1, "residual_bits": residual_bits}}))
    return path


def test_generate_checks_k_and_tune_config_before_loading(no_model, capsys, tmp_path):
    err = command_error(capsys, ["generate", str(tmp_path / "none")])
    assert "no such directory" in err
    err = command_error(capsys, ["generate", str(tmp_path)])
    assert "no config.json" in err
    bare = qdec_config(tmp_path / "bare", None)
    err = command_error(capsys, ["generate", str(bare), "--k", "0.02"])
    assert "--k 0.02" in err and "no residual store" in err and "--residual-bits" in err
    err = command_error(capsys, ["generate", str(bare), "--k", "16"])
    assert "--k 16" in err
    full = qdec_config(tmp_path / "full", 4)
    err = command_error(capsys, ["generate", str(full), "--tune-config", str(tmp_path / "t.json")])
    assert "tune config" in err and "does not exist" in err


def test_checkpoint_k_resolution(tmp_path, capsys):
    bare = qdec_config(tmp_path / "bare", None)
    full = qdec_config(tmp_path / "full", 4)
    assert cli_args.check_checkpoint_k(full, None, 0.02) == 0.02
    assert cli_args.check_checkpoint_k(full, 16, 0.02) == 16
    assert cli_args.check_checkpoint_k(bare, 0, 0.02) == 0
    assert capsys.readouterr().out == ""
    assert cli_args.check_checkpoint_k(bare, None, 0.02) == 0  # default k: runs k = 0, says so
    assert "no residual store; running k = 0 only" in capsys.readouterr().out
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not a JSON object"):
        cli_args.check_checkpoint_k(tmp_path / "broken", None, 0.02)


@pytest.mark.parametrize("text, value", [
    ("16", 16), ("0", 0), ("1", 1), (" 3 ", 3),
    ("0.05", 0.05), ("1.0", 1.0), ("0.", 0.0), ("5e-2", 0.05), ("1E-1", 0.1),
])
def test_k_rule(text, value):
    """An integer is a channel count (int), a number with a decimal point or
    exponent a fraction (float): what QDECLinear.k and qdec_infer read."""
    got = cli_args.k_value(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["-1", "1.5", "1e2", "nan", "inf", "", "16ch", "0x10"])
def test_k_rule_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="k "):
        cli_args.k_value(text)


def test_k_rule_reaches_the_layer():
    """int 1 is one channel, float 1.0 all of them, on a QDECLinear."""
    from conftest import make_layer

    from qdec.nn import QDECLinear

    layer = make_layer(8, 64, 3, 32)
    m = QDECLinear(layer.qweight, layer.scales, layer.zeros, 3, 32, 64, layer.residual,
                   layer.residual_scales, 4)
    m.k = cli_args.k_value("1")
    assert m.k == 1
    m.k = cli_args.k_value("1.0")
    assert m.k == 64
    assert cli_args.describe_k(1) == "1 channels"
    assert cli_args.describe_k(0.02) == "2.0% of input channels"


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def subparsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """The parser of each command, as main() builds them."""
    built = {}

    def capture(self, argv=None, namespace=None):
        built.update(next(a for a in self._actions
                          if isinstance(a, argparse._SubParsersAction)).choices)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        main(["demo"])
    return built


def test_help_shows_defaults_and_no_markup(capsys, monkeypatch):
    parsers = subparsers(monkeypatch)
    assert {"demo", "quantize", "generate", "eval", "tune", "report"} <= set(parsers)
    for command, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0:
                continue  # positionals and flags: nothing to default
            text = formatter._expand_help(action) if action.help else ""
            assert "default" in text or action.required, (
                f"qdec {command} {action.option_strings[0]}: help shows no default: {text!r}")
        text = parser.format_help()
        assert "``" not in text and "%%" not in text and ":func:" not in text, command
    monkeypatch.undo()
    assert "--seq-len SEQ_LEN     tokens per window (default: 2048)" in help_text(
        capsys, ["eval", "--help"])


def test_top_level_help_is_plain(capsys):
    text = help_text(capsys, ["--help"])
    assert "``" not in text and "--k" in text and "fraction" in text
    assert "2048" in help_text(capsys, ["eval", "--help"])
    assert "0.02" in help_text(capsys, ["generate", "--help"])


def test_default_texts_are_the_shipped_excerpts(capsys):
    text = help_text(capsys, ["eval", "--help"])
    assert "excerpt" in text and "wiki.test.raw" in text
    for path in (cli_args.DEFAULT_TEXT, cli_args.DEFAULT_CALIB):
        assert path.is_file() and 50_000 < path.stat().st_size <= 100_000
    # The test excerpt is the start of the full file, byte for byte (checked where the
    # full file is, beside the repository in the project's workspace; a clone has only
    # the excerpt).
    full = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if full.is_file():
        excerpt = cli_args.DEFAULT_TEXT.read_bytes()
        assert full.read_bytes()[:len(excerpt)] == excerpt
    # ... and ships in the wheel, with its license note.
    # (a regex, not tomllib: that is Python >= 3.11 and the project supports 3.10)
    block = re.search(r"^\[tool\.setuptools\.package-data\]\nqdec = (\[.*?\])$",
                      (REPO / "pyproject.toml").read_text(), re.M | re.S)
    assert block, "pyproject.toml has no [tool.setuptools.package-data] qdec = [...]"
    patterns = ast.literal_eval(block.group(1))
    for f in ("wikitext2_test_excerpt.txt", "wikitext2_valid_excerpt.txt", "README.md"):
        assert any(Path("data", f).match(p) for p in patterns), f
    assert "CC BY-SA 3.0" in (cli_args.DATA_DIR / "README.md").read_text()


def test_excerpts_hold_the_default_eval_windows():
    """Ten 2048-token windows and 16 calibration windows of 512 from the excerpts."""
    from qdec.eval.perplexity import load_text
    from qdec.models.gguf import read_gguf
    from qdec.models.llama import default_model_path, tokenizer_from_gguf

    tok = tokenizer_from_gguf(read_gguf(default_model_path()))
    text = tok(load_text(cli_args.DEFAULT_TEXT)).input_ids
    calib = tok(load_text(cli_args.DEFAULT_CALIB)).input_ids
    assert len(text) >= 10 * 2048 + 1 and len(calib) >= 16 * 512


def test_eval_reports_scored_tokens_and_phases(monkeypatch, tmp_path, capsys):
    """`qdec eval` end to end on a tiny random Llama: it names the phases before
    the first bar and prints the tokens it scored, not the length of the file."""
    import torch
    from test_eval_sweep import CharTokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    monkeypatch.setattr(llama, "load_gguf_llama", lambda path=None: (model, CharTokenizer()))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)  # 1800 chars = tokens
    out = tmp_path / "eval.json"
    assert main(["eval", "--text", str(text), "--calib", str(text), "--seq-len", "64",
                 "--max-windows", "2", "--variants", "rtn:2:32", "--fractions", "0.5",
                 "--policies", "dynamic", "--calib-samples", "2", "--calib-len", "32",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    results = json.loads(out.read_text())
    scored = results["reference"]["tokens"]
    assert 0 < scored < 1800 == results["text_tokens"]
    assert f"({scored} tokens scored in 2 windows of 64; the text has 1800)" in captured.out
    for what in ("loading the embedded SmolLM2-135M", f"tokenizing {text}",
                 f"calibration windows from {text}"):
        assert f"{what} ..." in captured.err and f"{what}: done in" in captured.err
