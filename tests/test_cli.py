"""The ``dynslice`` command line, run as a user would (a subprocess per call)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import logged, save_tiny
from safetensors.torch import load_file
from tiny import ARCHS, tiny_model
from transformers import AutoConfig

from dynslice_modifier import checkpoint_checks, cli, recipe_checks
from dynslice_modifier.adapters import ADAPTERS, PRE_NORM_LAYOUT
from dynslice_modifier.cli import (
    RECIPE_ONLY,
    SLICER_FLAGS,
    _compress_recipe,
    _in_cli_terms,
    build_parser,
    main,
    quant_modifiers,
)
from dynslice_modifier.evaluation import DEFAULT_WIKITEXT

DATA = ["--data", str(DEFAULT_WIKITEXT)]
SMALL = ["--samples", "8", "--seq-len", "32"]


def dynslice(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "dynslice_modifier.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"dynslice {args} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root / "tiny", "llama", True)
    (root / "quantize_only.yaml").write_text(
        "quant_stage:\n  quant_modifiers:\n"
        "    QuantizationModifier: {targets: Linear, scheme: FP8_DYNAMIC}\n"
    )
    (root / "broken.yaml").write_text("slice_stage: [unclosed\n")
    (root / "binary.yaml").write_bytes(b"slice_stage: \xff\xfe\n")
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text((root / "tiny" / "config.json").read_text())
    (root / "sb_over_sp.yaml").write_text(
        "slice_stage:\n  slice_modifiers:\n"
        "    DynamicSliceModifier: {sparsity: 0.2, slicing_base: 0.3}\n"
    )
    (root / "short.txt").write_text(" = T = \n\n t5 t6 t7 \n")
    (root / "latin1.txt").write_bytes(" = T = \n\n t5 \xdc t7 \n".encode("latin-1"))
    # Recipes llm-compressor would skip in silence, or fail on with an AttributeError.
    recipes = {
        "empty": "",
        "word": "hello\n",
        "list": "- a\n",
        "flat": "DynamicSliceModifier: {sparsity: 0.25}\n",
        "no_group": "slice_stage:\n  DynamicSliceModifier: {sparsity: 0.25}\n",
        # As llm-compressor merges a later oneshot's stage into a saved recipe.yaml.
        "merged": "default_stage_0:\n  default_modifiers:\n"
        "    DynamicSliceModifier: {sparsity: 0.25}\n",
        "bare": "slice_stage:\n  slice_modifiers:\n    DynamicSliceModifier:\n",
        "typo": "slice_stage:\n  slice_modifiers:\n    DynamicSliceModifier: {sparsty: 0.25}\n",
        # YAML readers keep the last of two equal keys: this would slice at 0.5.
        "twice": "slice_stage:\n  slice_modifiers:\n    DynamicSliceModifier: {sparsity: 0.1}\n"
        "  slice_modifiers:\n    DynamicSliceModifier: {sparsity: 0.5}\n",
        "misnamed": "slice_stage:\n  slice_modifiers:\n    DynamicSlicer: {sparsity: 0.25}\n",
        # Recipe arguments and an old stage setting are not modifiers, and are let be.
        "old_style": "args: {sp: 0.25}\nslice_stage:\n  run_type: oneshot\n  slice_modifiers:\n"
        "    DynamicSliceModifier: {sparsity: 0.2, slicing_base: 0.3}\n",
    }
    for name, text in recipes.items():
        (root / f"{name}.yaml").write_text(text)
    return root


def run_main(*args: str, cwd: Path, capsys) -> tuple[int, str, str]:
    """The CLI in this process: same code path, without a fresh interpreter per call."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(old)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", [[], ["scores"], ["compress"], ["eval"], ["report"]])
def test_help_is_complete(command, workdir, capsys):
    code, out, _ = run_main(*command, "--help", cwd=workdir, capsys=capsys)
    assert code == 0
    assert "usage: dynslice" in out
    if command == ["compress"]:
        for flag in (
            "--sparsity",
            "--target-params",
            "--slicing-base",
            "--round-to",
            "--basis",
            "--quantize",
            "--recipe",
            "--eval-windows",
            "--untie-embeddings",
            "--hadamard",
            "--align-bases",
            "--quantize-shortcuts",
            "--quantize-head",
            "--slice-head",
            "--profitable-only",
            "--no-profitable-only",
            "--data",
        ):
            assert flag in out
        # The fields no flag sets are named, so a reader knows to write a recipe for them.
        for field in RECIPE_ONLY:
            assert field in out


def test_version_is_the_package_version(workdir, capsys):
    from dynslice_modifier.version import __version__

    code, out, _ = run_main("--version", cwd=workdir, capsys=capsys)
    assert code == 0 and out.strip() == f"dynslice {__version__}"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices


def test_every_option_has_help_and_shows_its_default():
    for name, parser in _subparsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest} has no help"
            if action.default not in (None, False):
                assert f"default {action.default}" in action.help or (
                    f"default: {action.default}" in action.help
                ), f"{name} {action.dest}: {action.help}"


def test_every_slicer_field_is_a_flag_or_named_recipe_only():
    from llmcompressor.modifiers import Modifier

    from dynslice_modifier import DynamicSliceModifier

    own = set(DynamicSliceModifier.model_fields) - set(Modifier.model_fields)
    flags = {"sparsity", "target_params", "slicing_base", *SLICER_FLAGS}
    assert not flags & set(RECIPE_ONLY)
    assert own == flags | set(RECIPE_ONLY)


UNSET_SHOWN = {
    "round_to": "16, raised to what --quantize's kernels need",
    "rounding": "spectrum for dynamic widths, mean for constant ones",
}


def test_slicer_flags_take_their_defaults_from_the_modifier():
    from dynslice_modifier import DynamicSliceModifier

    parser = build_parser()
    actions = {a.dest: a for a in _subparsers()["compress"]._actions}
    for field in SLICER_FLAGS:
        default = DynamicSliceModifier.model_fields[field].default
        # Written out in the CLI, so that --help needs no llm-compressor.
        assert SLICER_FLAGS[field] == default, field
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        if default is None:  # what unset means
            shown = UNSET_SHOWN[field]
        # Unset flags are left out of the modifier's arguments, so it applies its own default.
        assert actions[field].default is None, field
        assert actions[field].help.endswith(f"(default: {shown})"), actions[field].help
    args = parser.parse_args(["compress", "m", "o", "--no-align-bases", "--round-to", "32"])
    assert args.align_bases is False and args.round_to == 32 and args.hadamard is None
    args = parser.parse_args(["compress", "m", "o", "--no-profitable-only"])
    assert args.profitable_only is False


# The CLI as the [serve] and [eval] environments run it: without llm-compressor.
_WITHOUT_LLMCOMPRESSOR = """
import contextlib, io, json, sys
# As in .venv-serve: any import of these raises ImportError.
sys.modules["llmcompressor"] = sys.modules["matplotlib"] = None
from dynslice_modifier.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    results.append([code, out.getvalue(), err.getvalue()])
assert "dynslice_modifier.modifier" not in sys.modules
print(json.dumps(results))
"""


def without_compression_stack(workdir: Path, commands: list[list[str]]) -> list[list]:
    """(exit code, stdout, stderr) of each command, run where neither llm-compressor nor
    matplotlib can be imported."""
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_LLMCOMPRESSOR, json.dumps(commands)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.splitlines()[-1])
    assert len(results) == len(commands)
    return results


def test_help_works_and_compress_names_its_extra_without_llm_compressor(workdir):
    commands = [["--help"], ["eval", "--help"], ["report", "--help"], ["compress", "--help"]]
    commands.append(["compress", "tiny", "bad", *SMALL, *DATA])
    results = without_compression_stack(workdir, commands)
    for (code, out, err), command in zip(results[:-1], commands[:-1], strict=True):
        assert code == 0 and "usage: dynslice" in out, (command, err)
    assert "--profitable-only" in results[3][1]
    code, _, err = results[-1]
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: compress needs llm-compressor")
    assert 'pip install "dynslice-modifier[compress]"' in err and err.count("\n") == 1
    assert not (workdir / "bad").exists()


def test_slicing_base_takes_auto_in_any_case_and_fractions_up_to_one():
    parser = build_parser()
    compress = ["compress", "model", "output", "--slicing-base"]
    for text in ("auto", "AUTO", "Auto"):
        assert parser.parse_args([*compress, text]).slicing_base == "auto"
    args = parser.parse_args([*compress, "1", "--target-params", "0.1"])
    assert args.slicing_base == 1.0


def test_constant_slicing_with_target_params_is_left_to_the_modifier(
    workdir, capsys, no_calibration
):
    # SB 1.0 is capped at the SP solved for: constant slicing, which the modifier accepts.
    args = ["compress", "tiny", "bad", "--target-params", "0.1", "--slicing-base", "1.0"]
    with pytest.raises(AssertionError, match="calibration started"):
        run_main(*args, *SMALL, *DATA, cwd=workdir, capsys=capsys)
    assert not (workdir / "bad").exists()


def test_library_errors_are_put_in_flag_terms():
    def flags(message: str) -> str:
        return _in_cli_terms(message, slicer_flags=True)

    assert flags("slicing_base: auto needs sparsity > 0 (or target_params)") == (
        "--slicing-base auto needs --sparsity > 0 (or --target-params)"
    )
    assert flags("round_to=128 exceeds hidden_size=64; set round_to to at most 64") == (
        "round_to=128 exceeds hidden_size=64; set --round-to to at most 64"
    )
    assert flags("set basis: layer, align_bases: false, hadamard: true") == (
        "set --basis layer, --no-align-bases, --hadamard"
    )
    # Words that only contain a field's name, or are the field's name as a plain word.
    untouched = "effective_slicing_base, the basis of hadamard rotations, --round-to, rounding"
    assert flags(untouched) == untouched
    # A recipe's errors keep the recipe's names.
    assert _in_cli_terms("set round_to to at most 64") == "set round_to to at most 64"


def test_the_slicers_warnings_name_the_flags_in_a_flag_run(workdir, capsys):
    from test_slicing import slice_in_memory
    from tiny import tiny_model

    args = ["compress", "tiny", "warned", "--sparsity", "0.2", "--slicing-base", "0"]
    with logged() as records:
        code, _, err = run_main(*args, *SMALL, *DATA, cwd=workdir, capsys=capsys)
    assert code == 0, err
    (whole,) = [m for _, m in records if m.startswith("Leaving")]
    assert whole.endswith(
        "against the --sparsity 0.2 asked for; to reach it, use a larger "
        "--sparsity, --target-params or --basis layer."
    ), whole
    # Outside the CLI the same warning names the modifier's fields again.
    with logged() as records:
        slice_in_memory(tiny_model("llama", True, layers=3), sparsity=0.2, slicing_base=0.0)
    (whole,) = [m for _, m in records if m.startswith("Leaving")]
    assert whole.endswith("use a larger sparsity, target_params or basis: layer."), whole


def test_compress_writes_model_report_and_summary(workdir):
    def contents() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (workdir / "tiny").iterdir() if p.is_file()}

    before = contents()
    result = dynslice(
        "compress",
        "tiny",
        "out",
        "--sparsity",
        "0.25",
        "--round-to",
        "8",
        "--rounding",
        "nearest",
        *SMALL,
        *DATA,
        "--eval-windows",
        "1",
        cwd=workdir,
    )
    out = workdir / "out"
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["slicing"]["rounding"] == "nearest"
    report = (out / "slicing_report.md").read_text()
    # Titled with the output's name, not the scratch directory it was written in.
    assert report.startswith("# Sliced checkpoint: out\n")
    assert "round_to 8 (nearest rounding)" in report
    assert (out / "slicing_report.png").read_bytes()[:4] == b"\x89PNG"
    assert "parameters:" in result.stdout and "weights on disk" in result.stdout
    assert "perplexity (1 x 1024 tokens): dense" in result.stdout
    # The input model is read, never written.
    assert contents() == before
    assert not list(workdir.glob(".out.partial-*"))


def test_compress_can_quantize_the_shortcuts_and_slice_and_quantize_the_head(workdir, capsys):
    args = ["compress", "tiny", "out-qs", "--sparsity", "0.25", "--round-to", "16"]
    args += ["--quantize", "w8a8", "--quantize-shortcuts", "--quantize-head", "--hadamard"]
    code, _, err = run_main(*args, "--slice-head", *SMALL, *DATA, cwd=workdir, capsys=capsys)
    assert code == 0, err
    config = json.loads((workdir / "out-qs" / "config.json").read_text())
    assert config["slicing"]["quantizable_shortcuts"] is True
    # The int8 head reads the last layer's width.
    final = config["slicing"]["final_dim"]
    assert final == config["slicing"]["mlp_dims"][-1] < config["hidden_size"]
    assert config["slicing"]["hadamard"] is True
    ignored = config["quantization_config"]["ignore"]
    assert not any("shortcut" in name or "lm_head" in name for name in ignored), ignored
    assert config["tie_word_embeddings"] is False
    head = load_file(workdir / "out-qs" / "model.safetensors")["lm_head.weight"]
    assert head.dtype == torch.int8 and head.shape[1] == final


def test_main_names_missing_packages_and_restores_signal_handlers(workdir, capsys, monkeypatch):
    import importlib

    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)]
    real = importlib.import_module

    def without_compressed_tensors(name, *args):
        if name == "compressed_tensors":
            raise ImportError("No module named 'compressed_tensors'")
        return real(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", without_compressed_tensors)
    code, _, err = run_main("scores", "tiny", *SMALL, *DATA, cwd=workdir, capsys=capsys)
    assert code == 2 and err.startswith("error: scores needs compressed-tensors"), err
    assert 'pip install "dynslice-modifier[compress]"' in err
    # main() installs its own SIGTERM/SIGHUP handlers for a run and gives the caller's back.
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)] == before


def test_scores_eval_and_report(workdir, capsys):
    code, out, _ = run_main(
        "scores", "tiny", *SMALL, *DATA, "--json", "scores.json", cwd=workdir, capsys=capsys
    )
    assert code == 0 and "LR score" in out
    scores = json.loads((workdir / "scores.json").read_text())["lr_scores"]
    assert len(scores) == 3
    code, _, err = run_main(
        "compress",
        "tiny",
        "out2",
        "--sparsity",
        "0.25",
        "--slicing-base",
        "auto",
        "--round-to",
        "8",
        *SMALL,
        *DATA,
        cwd=workdir,
        capsys=capsys,
    )
    assert code == 0, err
    # The same calibration samples: the scores the modifier sliced by.
    slicing = json.loads((workdir / "out2" / "config.json").read_text())["slicing"]
    assert slicing["lr_scores"] == pytest.approx(scores, abs=1e-6)
    code, _, err = run_main("scores", "out2", *SMALL, *DATA, cwd=workdir, capsys=capsys)
    assert code == 2 and "out2 is already sliced" in err and "slicing.lr_scores" in err, err
    code, out, _ = run_main("eval", "out2", "--windows", "1", *DATA, cwd=workdir, capsys=capsys)
    assert code == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynslice_modifier.evaluation import perplexity, wikitext_tokens, windows

    # The protocol's evaluation half: windows from the second half of the text.
    tokens = wikitext_tokens(AutoTokenizer.from_pretrained(workdir / "out2"), DEFAULT_WIKITEXT)
    model = AutoModelForCausalLM.from_pretrained(workdir / "out2")
    expected = perplexity(model, windows(tokens[len(tokens) // 2 :], 1, 1024))
    assert float(out.rsplit(":", 1)[1]) == pytest.approx(expected, abs=1e-3)
    code, out, _ = run_main(
        "report", "out2", "--out", str(workdir / "new" / "dir"), cwd=workdir, capsys=capsys
    )
    assert code == 0 and "| layer | LR score |" in out
    assert "`slicing_base: auto` search" in out and "| yes |" in out
    assert (workdir / "new" / "dir" / "slicing_report.png").exists()
    # As in .venv-serve (no matplotlib there): the summary, without the plot. A path that
    # is no checkpoint is refused before any directory is made for it.
    commands = [["report", "out2", "--out", "plain"], ["report", "no/such/checkpoint"]]
    (code, out, err), (bad_code, _, bad_err) = without_compression_stack(workdir, commands)
    assert code == 0, err
    assert "| layer | LR score |" in out and "matplotlib is not installed" in out
    assert (workdir / "plain" / "slicing_report.md").exists()
    assert not (workdir / "plain" / "slicing_report.png").exists()
    assert bad_code == 2 and "Traceback" not in bad_err and "no/such/checkpoint" in bad_err
    assert not (workdir / "no").exists()
    code, _, err = run_main(
        "report", "out2", "--out", "out2/config.json", cwd=workdir, capsys=capsys
    )
    assert code == 2 and "is a file: name a directory" in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "tiny", "bad", "--sparsity", "1.5"], "must be in [0, 1)"),
        (["compress", "tiny", "bad", "--samples", "0"], "must be > 0"),
        (["compress", "tiny", "tiny/sub"], "overlaps the input model"),
        (["compress", "nowhere", "bad"], "nowhere does not exist: pass the directory"),
        (["eval", "."], ". is not a model directory (no config.json)"),
        (["compress", "tiny/config.json", "bad"], "tiny/config.json is a file: pass the directory"),
        # 1 is everything, not 1%.
        (["compress", "tiny", "bad", "--sparsity", "1"], "must be in [0, 1), got 1\n"),
        (["eval", "tiny", "--data", "missing.txt"], "text file missing.txt not found"),
        (["eval", "tiny", "--data", "latin1.txt"], "latin1.txt is not UTF-8 text"),
        # The modifier's check, in flags and without pydantic's wrapping.
        (
            ["compress", "tiny", "bad", "--sparsity", "0.2", "--slicing-base", "0.3"],
            "error: --slicing-base must be in [0, sparsity=0.2], got 0.3 (--slicing-base ==",
        ),
        # A recipe's error names the recipe's field.
        (
            ["compress", "tiny", "bad", "--recipe", "sb_over_sp.yaml"],
            "error: slicing_base must be in [0, sparsity=0.2], got 0.3",
        ),
        (["compress", "tiny", "bad", "--sparsity", "25"], "got 25 (a fraction: 0.25 for 25%)"),
        (["compress", "tiny", "bad", "--target-params", "10"], "(a fraction: 0.1 for 10%)"),
        (["compress", "tiny", "bad", "--slicing-base", "5"], "(a fraction: 0.05 for 5%)"),
        (
            ["compress", "tiny", "bad", "--slicing-base", "half"],
            "--slicing-base: a fraction in [0, 1] or 'auto', got half",
        ),
        (["compress", "tiny", "bad", "--sparsity", "a"], "--sparsity: must be a number, got 'a'"),
        (
            ["compress", "HuggingFaceTB/SmolLM2-135M", "bad"],
            "models are not downloaded: if it is a Hugging Face Hub id, download it first "
            "(hf download HuggingFaceTB/SmolLM2-135M --local-dir DIR) and pass DIR",
        ),
        (
            ["report", "tiny"],
            "not a sliced checkpoint (model_type 'llama'); slice it first with: dynslice "
            "compress tiny OUTPUT",
        ),
        (
            ["compress", "tiny", "bad", "--quantize", "fp8", "--quantize-head"],
            "--quantize-head is offered with --quantize w8a8 only",
        ),
        (
            ["compress", "tiny", "bad", "--recipe", "r.yaml", "--hadamard", "--round-to", "8"],
            "drop --round-to --hadamard or put them in the recipe",
        ),
        (
            ["compress", "tiny", "bad", "--recipe", "r.yaml", "--no-hadamard"],
            "drop --no-hadamard or put them in the recipe",
        ),
        (["compress", "tiny", "bad", "--recipe", "broken.yaml"], "broken.yaml is not valid YAML"),
        (["compress", "tiny", "bad", "--recipe", "binary.yaml"], "is not valid YAML (UTF-8"),
        (["compress", "tiny", "bad", "--seed", "1" + "0" * 20], "from -2**63 to 2**64 - 1"),
        (["compress", "no_weights", "bad"], "has a config.json but no weights"),
        (["eval", "no_weights"], "has a config.json but no weights"),
        (["compress", "tiny", "bad", "--round-to", "128"], "set --round-to to at most 64"),
        (["compress", "tiny", "bad", "--quantize", "w4a16"], "or one without groups, such as W8A8"),
        (["compress", "tiny", "bad", "--eval-windows", "0"], "must be > 0"),
        (["compress", "tiny", "bad", "--target-params", "0"], "must be in (0, 1), got 0"),
        # The library's message, in the CLI's flags.
        (
            ["compress", "tiny", "bad", "--samples", "1", "--seq-len", "16"],
            "raise --samples or --seq-len",
        ),
        (
            [
                "compress",
                "tiny",
                "bad",
                "--slicing-base",
                "auto",
                "--samples",
                "2",
                "--seq-len",
                "40",
            ],
            "raise --samples or lower auto_holdout (a recipe setting: --recipe)",
        ),
        (
            ["compress", "tiny", "bad", "--round-to", "64", "--sparsity", "0.5"],
            "nothing can be sliced: --round-to is hidden_size",
        ),
        (["frobnicate"], "invalid choice"),
        # Refused after the Layer Redundancy pass, before anything is written.
        (
            [
                "compress",
                "tiny",
                "bad",
                "--sparsity",
                "0.125",
                "--slicing-base",
                "0.125",
                "--round-to",
                "8",
            ],
            "--sparsity 0.125 would slice no layer",
        ),
    ],
)
def test_bad_arguments_fail_clearly(args, message, workdir, capsys):
    extra = [*SMALL, *DATA] if args[0] == "compress" else []
    if "--samples" in args:
        extra = DATA
    code, _, err = run_main(*args, *extra, cwd=workdir, capsys=capsys)
    assert code != 0
    assert message in err, err
    # No function names (argparse's "invalid _fraction value") or pydantic boilerplate.
    assert "invalid _" not in err and "pydantic" not in err and "validation error" not in err
    assert not (workdir / "bad").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantize-shortcuts"], "needs a --quantize scheme"),
        (["--sparsity", "0.2", "--target-params", "0.1"], "either --sparsity or --target-params"),
        (["--recipe", "quantize_only.yaml"], "has no DynamicSliceModifier"),
        (["--recipe", "missing.yaml"], "--recipe missing.yaml does not exist or is not a file"),
        (["--recipe", "empty.yaml"], "empty.yaml has no stage: a recipe maps each <name>_stage"),
        (["--recipe", "word.yaml"], "word.yaml has no stage"),
        (["--recipe", "list.yaml"], "list.yaml has no stage"),
        (["--recipe", "flat.yaml"], "'DynamicSliceModifier' is not inside a stage"),
        (["--recipe", "no_group.yaml"], "slice_stage.DynamicSliceModifier is not a <group>_mod"),
        (
            ["--recipe", "merged.yaml"],
            "'default_stage_0' is not inside a stage and would be "
            "skipped; rename it default_0_stage",
        ),
        (["--recipe", "bare.yaml"], "DynamicSliceModifier needs a mapping of its settings"),
        (
            ["--recipe", "typo.yaml"],
            "DynamicSliceModifier has no setting 'sparsty' (did you mean 'sparsity'?)",
        ),
        (["--recipe", "twice.yaml"], "'slice_modifiers' is given twice in one mapping"),
        (["--recipe", "misnamed.yaml"], "'DynamicSlicer' found. (did you mean DynamicSliceM"),
        # Passes the layout check, then fails on its values, as a recipe's fields.
        (["--recipe", "old_style.yaml"], "slicing_base must be in [0, sparsity=0.2]"),
    ],
)
def test_compress_refuses_conflicting_flags_before_reading_the_text(
    flags, message, workdir, capsys, monkeypatch
):
    import dynslice_modifier.evaluation

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the calibration text was read")

    monkeypatch.setattr(dynslice_modifier.evaluation, "wikitext_tokens", forbidden)
    code, _, err = run_main("compress", "tiny", "bad", *flags, *DATA, cwd=workdir, capsys=capsys)
    assert code != 0 and message in err, err
    assert not (workdir / "bad").exists()


def test_scores_checks_its_json_path_before_scoring(workdir, capsys, monkeypatch):
    import dynslice_modifier.calibration

    def forbidden(*_args, **_kwargs):
        raise AssertionError("scoring started")

    monkeypatch.setattr(dynslice_modifier.calibration, "capture_layer_inputs", forbidden)
    args = ["scores", "tiny", *SMALL, *DATA, "--json"]
    code, _, err = run_main(*args, "missing/s.json", cwd=workdir, capsys=capsys)
    assert code == 2 and "--json missing/s.json: directory missing does not exist" in err, err
    code, _, err = run_main(*args, ".", cwd=workdir, capsys=capsys)
    assert code == 2 and "--json . is a directory" in err, err


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("short.txt", "tokens of the text's first half (calibration): give a longer text, or"),
        (".", "is a directory"),
    ],
)
def test_unusable_text_names_the_fix(data, message, workdir, capsys):
    code, _, err = run_main(
        "compress", "tiny", "bad", *SMALL, "--data", data, cwd=workdir, capsys=capsys
    )
    assert code != 0 and message in err, err
    assert not (workdir / "bad").exists()


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("notes", "is not empty and is not a sliced checkpoint"),
        ("results.csv", "exists and is not a directory"),
        (".", "is the current directory or holds it"),
        ("..", "is the current directory or holds it"),
    ],
)
def test_compress_replaces_only_an_earlier_result(output, message, workdir, capsys):
    # The output is replaced whole; anything else at that path would be deleted with it.
    here = workdir / "up" / "here"
    (here / "notes").mkdir(parents=True, exist_ok=True)
    (here / "notes" / "thesis.tex").write_text("keep me")
    (here / "results.csv").write_text("a,b\n")
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    tiny = str(workdir / "tiny")
    code, _, err = run_main("compress", tiny, output, *SMALL, *DATA, cwd=here, capsys=capsys)
    assert code != 0 and message in err, err
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
    assert (here / "notes" / "thesis.tex").read_text() == "keep me"


def test_an_earlier_result_with_files_of_its_owner_is_not_replaced(tmp_path):
    from dynslice_modifier.output import check_replaceable

    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "dynslice"}')
    saved = ("model-00001-of-00002.safetensors", "recipe.yaml", "tokenizer.json")
    for name in (*saved, "slicing_report.md", "chat_template.jinja", "tokenizer.model.v3"):
        (target / name).write_text("")
    (target / "additional_chat_templates").mkdir()
    check_replaceable(target)  # what a save writes, and nothing else
    (target / "evaluation").mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"also \['evaluation/', 'notes.txt'\], which no save"):
        check_replaceable(target)


@pytest.mark.parametrize(
    "name", ["dense_baseline.safetensors", "tokenizer_notes.txt", "slicing_report.reviewed.docx"]
)
def test_a_file_of_its_owner_named_like_a_save_file_is_not_replaced(tmp_path, name):
    # Only the names a save writes count as its own: a look-alike is the user's.
    from dynslice_modifier.output import check_replaceable

    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "dynslice"}')
    (target / name).write_text("keep me")
    with pytest.raises(ValueError, match=rf"also \['{re.escape(name)}'\], which no save"):
        check_replaceable(target)


def test_next_run_clears_what_a_killed_one_left(tmp_path):
    from dynslice_modifier.output import atomic_directory

    # A PID that was alive and is gone, as a run killed with SIGKILL leaves it.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = socket.gethostname()
    target = tmp_path / "out"
    torn = tmp_path / f".out.partial-{host}-{child.pid}-abc123"
    # Killed between moving the finished output aside and moving the new one in.
    stranded = tmp_path / f".out.previous-{host}-{child.pid}-def456"
    elsewhere = tmp_path / f".out.partial-another-host-{child.pid}-ghi789"
    for path in (torn, stranded, elsewhere):
        path.mkdir()
    (stranded / "config.json").write_text('{"model_type": "dynslice"}')

    with pytest.raises(RuntimeError), atomic_directory(target):
        raise RuntimeError("this run fails too")
    # The stranded output is back where it was, the dead scratch is gone, and another
    # host's directory, whose PID means nothing here, is left alone.
    assert (target / "config.json").read_text() == '{"model_type": "dynslice"}'
    assert not torn.exists() and not stranded.exists()
    assert elsewhere.exists()


def test_an_output_with_a_long_name_is_written_and_replaced(tmp_path):
    # A legal 230-character name: scratch names built on it would pass 255 bytes.
    from dynslice_modifier.output import atomic_directory

    target = tmp_path / ("o" * 230)
    for text in ("first", "second"):
        with atomic_directory(target) as scratch:
            (scratch / "config.json").write_text(f'{{"model_type": "dynslice", "run": "{text}"}}')
    assert json.loads((target / "config.json").read_text())["run"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_outputs_that_cannot_be_renamed_into_place_are_refused(tmp_path, monkeypatch):
    from dynslice_modifier import output

    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone" / "out")
    # As compress checks it, through check_target, and as the write does.
    with pytest.raises(ValueError, match="symbolic link to nothing"):
        output.check_target(link, [tmp_path / "model"])
    with pytest.raises(ValueError, match="symbolic link to nothing"), output.atomic_directory(link):
        pass
    # An earlier output whose files could not be deleted once replaced.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "config.json").write_text('{"model_type": "dynslice"}')
    with monkeypatch.context() as patch:
        patch.setattr(output.os, "access", lambda path, mode: Path(path) != earlier)
        with pytest.raises(ValueError, match=r"earlier is not writable.*chmod u\+w"):
            output.check_replaceable(earlier)
    mounted = tmp_path / "volume"
    mounted.mkdir()
    monkeypatch.setattr(output.os.path, "ismount", lambda path: Path(path) == mounted)
    with pytest.raises(ValueError, match=r"is a mount point.*volume/model"):
        output.check_replaceable(mounted)
    monkeypatch.setattr(output.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path} is not writable"):
        output.check_replaceable(tmp_path / "new" / "out")
    assert not (tmp_path / "gone").exists() and not (tmp_path / "new").exists()
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt is a file, not a directory"):
        output.check_replaceable(tmp_path / "notes.txt" / "out")


def test_a_failed_run_takes_back_the_directories_it_created(tmp_path):
    from dynslice_modifier.output import atomic_directory

    runs = tmp_path / "runs"
    with pytest.raises(RuntimeError), atomic_directory(runs / "2024-06" / "sliced"):
        raise RuntimeError("calibration failed")
    assert list(tmp_path.iterdir()) == []
    # A directory that something else wrote into meanwhile stays, with what it holds.
    with pytest.raises(RuntimeError), atomic_directory(runs / "2024-06" / "sliced"):
        (runs / "log.txt").write_text("kept")
        raise RuntimeError("calibration failed")
    assert [p.name for p in runs.iterdir()] == ["log.txt"]


def test_a_failed_rename_leaves_the_previous_output_and_no_scratch(tmp_path, monkeypatch):
    from dynslice_modifier import output

    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "dynslice"}')
    rename = os.replace

    def busy(source, destination):
        # The finished output is moved aside; moving the new one in fails.
        if Path(source).name.startswith(".out.partial-"):
            raise OSError(16, "Device or resource busy")
        rename(source, destination)

    monkeypatch.setattr(output.os, "replace", busy)
    with pytest.raises(OSError, match="busy"), output.atomic_directory(target) as scratch:
        (scratch / "config.json").write_text('{"model_type": "dynslice", "new": true}')
    assert (target / "config.json").read_text() == '{"model_type": "dynslice"}'
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_model_without_a_tokenizer_is_named(workdir, capsys):
    bare = workdir / "bare"
    bare.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((workdir / "tiny" / name).read_bytes())
    code, _, err = run_main("compress", "bare", "bad", *SMALL, *DATA, cwd=workdir, capsys=capsys)
    assert code != 0 and "no usable tokenizer in bare" in err, err
    assert "copy its files (tokenizer.json, tokenizer_config.json)" in err
    assert not (workdir / "bad").exists()


def test_too_little_disk_fails_before_calibration(workdir, capsys, monkeypatch, no_calibration):
    import shutil

    # The output may need a quarter more than the input's weights (rotation alone adds
    # shortcut matrices), and a MiB for the rest.
    needed = int(1.25 * (workdir / "tiny" / "model.safetensors").stat().st_size) + 2**20
    usage = shutil.disk_usage(workdir)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=needed - 1))
    code, _, err = run_main("compress", "tiny", "bad", *SMALL, *DATA, cwd=workdir, capsys=capsys)
    assert code != 0 and "not enough free disk for the output" in err
    assert f"about {needed / 2**20:.0f} MiB needed" in err
    assert not (workdir / "bad").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=needed))
    with pytest.raises(AssertionError, match="calibration started"):
        run_main("compress", "tiny", "bad", *SMALL, *DATA, cwd=workdir, capsys=capsys)


# A compress run in a child process that dies mid-save: `save_pretrained` writes part of
# the weights file and the process is SIGKILLed (no cleanup handler can run), or raises
# inside a decoder layer's forward during calibration, or is sent SIGTERM (what timeout,
# Slurm and docker stop send) once the model is written.
_DIE = """
import os, signal, sys
from transformers import modeling_utils
from dynslice_modifier import cli
mode = sys.argv[1]
if mode == "term-at-report":
    # Everything but the report is written: the scratch directory looks finished.
    from dynslice_modifier import report
    report.write_report = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM)
elif mode == "kill-mid-save":
    def half_write(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(bytes(1024))
        os.kill(os.getpid(), signal.SIGKILL)
    modeling_utils.safe_save_file = half_write
else:
    from transformers.models.llama import modeling_llama
    if mode == "interrupt-in-layer":
        error = KeyboardInterrupt()
    else:
        error = RuntimeError("injected failure inside a decoder layer")
    def broken(self, *args, **kwargs):
        raise error
    modeling_llama.LlamaMLP.forward = broken
cli.main(sys.argv[2:])
"""


@pytest.mark.parametrize(
    "mode", ["kill-mid-save", "raise-in-layer", "interrupt-in-layer", "term-at-report"]
)
def test_interrupted_compress_leaves_previous_output_intact(workdir, mode):
    args = ["compress", "tiny", "kept", "--sparsity", "0.25", "--round-to", "8", *SMALL, *DATA]
    if not (workdir / "kept" / "config.json").exists():
        dynslice(*args, cwd=workdir)
    before = {p.name: p.read_bytes() for p in (workdir / "kept").iterdir() if p.is_file()}
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _DIE, mode, *args[:3], "--sparsity", "0.5", *args[5:]],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    after = {p.name: p.read_bytes() for p in (workdir / "kept").iterdir() if p.is_file()}
    assert after == before
    leftovers = list(workdir.glob(".kept.partial-*"))
    if mode == "kill-mid-save":
        assert result.returncode == -9, result.stderr[-2000:]
        # Nothing could clean up: only the hidden scratch directory with the torn file is
        # left, and the next run for the same target removes it.
        assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").stat().st_size == 1024
        dynslice(*args, cwd=workdir)
        assert not list(workdir.glob(".kept.partial-*"))
    elif mode == "term-at-report":
        assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
        assert not leftovers  # removed as on an exception
    elif mode == "interrupt-in-layer":
        # Ctrl-C: one line, no traceback, the scratch checkpoint removed.
        assert result.returncode == 130, result.stderr[-2000:]
        assert result.stderr.rstrip().endswith("interrupted") and "Traceback" not in result.stderr
        assert not leftovers
    else:
        assert result.returncode != 0 and "injected failure" in result.stderr
        assert not leftovers  # removed on the exception


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, r"\(1 \+ weight\)"),
        (
            {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]},
            "not a causal language model",
        ),
    ],
)
def test_compress_refuses_an_architecture_from_its_config_alone(config, message, tmp_path, capsys):
    # No weights and no tokenizer: the refusal comes before either would be read (loading a
    # large model's weights takes minutes).
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = run_main(
        "compress", str(model), str(tmp_path / "out"), cwd=tmp_path, capsys=capsys
    )
    assert code == 2
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_directory_named_like_a_save_file_is_foreign(tmp_path):
    from dynslice_modifier.output import check_replaceable

    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "dynslice"}')
    (target / "tokenizer_experiments").mkdir()
    with pytest.raises(ValueError, match=r"also \['tokenizer_experiments/'\]"):
        check_replaceable(target)


def test_an_output_that_holds_the_input_overlaps_it(tmp_path):
    from dynslice_modifier.output import check_target

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    with pytest.raises(ValueError, match="overlaps the input model"):
        check_target(tmp_path / "models", [tmp_path / "models" / "tiny"])


def test_a_live_runs_scratch_is_left_alone(tmp_path):
    from dynslice_modifier.output import atomic_directory

    live = tmp_path / f".out.partial-{socket.gethostname()}-{os.getpid()}-zzz"
    live.mkdir()
    with atomic_directory(tmp_path / "out") as scratch:
        (scratch / "config.json").write_text("{}")
    assert live.exists()


def test_off_switches_reach_the_modifier():
    args = build_parser().parse_args(
        ["compress", "m", "o", "--no-align-bases", "--no-profitable-only", "--no-hadamard"]
    )
    (slicer,) = _compress_recipe(args, None)
    assert (slicer.align_bases, slicer.profitable_only, slicer.hadamard) == (False, False, False)


def test_gains_are_printed_as_sliced_over_dense(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(bytes(3 * 2**20))
    monkeypatch.setattr(cli, "_perplexity", lambda path, _: 12.0 if path == out else 10.0)
    cli._print_gains(tmp_path / "dense", out, 4 * 2**20, 5.0, None, 1, "r")
    text = capsys.readouterr().out
    assert "weights on disk: 4.0 MiB -> 3.0 MiB (75.0%)" in text
    assert "dense 10.00 -> compressed 12.00 (1.20x)" in text


def test_every_quantize_choice_keeps_the_head_unless_asked():
    config = tiny_model().config
    for scheme in ("w4a16", "w8a8", "fp8"):
        (quantizer,) = quant_modifiers(scheme, config)
        assert "lm_head" in quantizer.ignore, scheme
    (quantizer,) = quant_modifiers("w8a8", config, quantize_head=True)
    assert "lm_head" not in quantizer.ignore


def test_w4a16_keeps_the_output_linears_the_adapter_names_when_groups_do_not_fit(
    monkeypatch,
):
    # The tiny model's attention (4 x 16), MLP (128) and residual (64) widths: groups of
    # 128 fit the MLP alone. The names come from the architecture's adapter, not from Llama's.
    config = tiny_model().config
    (quantizer,) = quant_modifiers("w4a16", config, quantize_shortcuts=True)
    assert quantizer.ignore == ["lm_head", "re:.*o_proj$", "re:.*input_projection$"]
    config.intermediate_size = 96
    renamed = replace(ADAPTERS["llama"], layout=PRE_NORM_LAYOUT | {"attn_output": "dense"})
    monkeypatch.setitem(ADAPTERS, "llama", renamed)
    (quantizer,) = quant_modifiers("w4a16", config)
    assert quantizer.ignore == ["lm_head", "re:.*dense$", "re:.*down_proj$"]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_complete_checkpoint_passes_the_weights_check(tmp_path, arch, tied):
    path = save_tiny(tmp_path / arch, arch, tied)
    checkpoint_checks.check_weights(path, AutoConfig.from_pretrained(path))


def test_a_damaged_or_incomplete_checkpoint_is_refused_before_loading(tmp_path):
    # transformers would fail deep in the load on the first, and fill the missing tensors of
    # the others with random numbers, which compress would then slice and save.
    path = tmp_path / "sharded"
    tiny_model().save_pretrained(path, max_shard_size="40KB")
    config = AutoConfig.from_pretrained(path)
    checkpoint_checks.check_weights(path, config)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=rf"{shards[-1].name} is not a readable safetensors"):
        checkpoint_checks.check_weights(path, config)
    shards[-1].write_bytes(data)
    config.num_hidden_layers += 1
    with pytest.raises(ValueError, match=r"lack model\.layers\.3\..* \(9 in all\), which its"):
        checkpoint_checks.check_weights(path, config)


def test_a_config_that_does_not_belong_to_the_weights_is_refused_before_loading(tmp_path):
    # Fewer layers: transformers drops the rest with a warning that they "can be ignored",
    # and compress would write a truncated model. Other sizes: it fails deep in the load.
    path = tmp_path / "m"
    tiny_model().save_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    config.num_hidden_layers = 2
    with pytest.raises(ValueError, match=r"hold model\.layers\.2\..* beyond the 2 layers"):
        checkpoint_checks.check_weights(path, config)
    config = AutoConfig.from_pretrained(path)
    config.intermediate_size = 96
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.weight is \[64, 128\] in the files, "):
        checkpoint_checks.check_weights(path, config)


def test_unreadable_configs_mismatched_tokenizers_and_failed_writes_are_named(tmp_path, capsys):
    from safetensors import SafetensorError

    path = save_tiny(tmp_path / "m", "llama", True)
    config = AutoConfig.from_pretrained(path)
    with pytest.raises(ValueError, match=r"tokenizer in .* ids up to 128, but .* 128 rows"):
        checkpoint_checks.check_vocabulary(path, [0, 5, 128], config)
    checkpoint_checks.check_vocabulary(path, torch.tensor([[0, 127]]), config)
    failed = r"reading the model or writing out failed: disk full"
    with pytest.raises(OSError, match=failed), cli._writing(Path("out"), path):
        raise SafetensorError("disk full")
    (path / "config.json").write_text("[]")
    for command in ("compress", "eval", "scores"):
        extra = [str(tmp_path / "out")] if command == "compress" else []
        code, _, err = run_main(command, str(path), *extra, *DATA, cwd=tmp_path, capsys=capsys)
        assert code == 2 and "config.json is not a readable model config" in err, err


def test_a_permission_lost_mid_run_is_named_with_the_fix(tmp_path, monkeypatch):
    from dynslice_modifier import output

    # The output's directory turned read-only during the run: the rename into place fails,
    # and so does removing the unfinished scratch directory.
    def read_only(src, dst):
        raise PermissionError(13, "Permission denied", str(src), None, str(dst))

    monkeypatch.setattr(output.os, "replace", read_only)
    monkeypatch.setattr(output.shutil, "rmtree", lambda *args, **kwargs: None)
    target = tmp_path / "out"
    with (
        pytest.raises(OSError, match=rf"writing {target} failed: .*Permission denied.*make it "),
        pytest.warns(UserWarning, match=r"could not remove the unfinished output .*\.out\.partial"),
        cli._writing(target, tmp_path / "model"),
        output.atomic_directory(target) as scratch,
    ):
        (scratch / "config.json").write_text("{}")
    assert not target.exists()
    # The input's files are not the output's.
    unreadable = PermissionError(13, "Permission denied", str(tmp_path / "model" / "a"))
    with pytest.raises(PermissionError) as raised, cli._writing(target, tmp_path / "model"):
        raise unreadable
    assert raised.value is unreadable


def test_eval_leaves_architectures_whose_names_transformers_converts_to_transformers(
    tmp_path, capsys
):
    # An MoE checkpoint stores one tensor per expert, which transformers fuses on load: the
    # weights check, which compares stored names, knows only the slicer's architectures.
    from conftest import word_tokenizer
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=2,
        num_experts_per_tok=1,
    )
    path = tmp_path / "moe"
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    args = ("eval", str(path), "--windows", "1", "--window-len", "32", *DATA)
    code, out, err = run_main(*args, cwd=tmp_path, capsys=capsys)
    assert code == 0 and "perplexity of" in out, err


def test_recipes_may_merge_keys_but_not_repeat_them(tmp_path):
    recipe = tmp_path / "merged.yaml"
    recipe.write_text(
        "slice_stage:\n  slice_modifiers:\n"
        "    DynamicSliceModifier: {<<: {sparsity: 0.2, round_to: 8}, sparsity: 0.25}\n"
    )
    recipe_checks.check_recipe_layout(str(recipe))
    recipe.write_text("slice_stage:\n  slice_modifiers:\n    DynamicSliceModifier: {? [1]: 2}\n")
    with pytest.raises(yaml.YAMLError, match="found unhashable key"):
        recipe_checks.check_recipe_layout(str(recipe))


def test_the_weights_check_reads_what_transformers_loads(tmp_path):
    # An index that a later unsharded save left behind (transformers reads model.safetensors
    # first), and a tied table stored under the head's name (it loads from either).
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    path = tmp_path / "m"
    model.save_pretrained(path, max_shard_size="40KB")
    model.save_pretrained(path)
    assert (path / "model.safetensors.index.json").exists()
    config = AutoConfig.from_pretrained(path)
    checkpoint_checks.check_weights(path, config)
    state = {k: v.clone() for k, v in model.state_dict().items() if "embed_tokens" not in k}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"]
    checkpoint_checks.check_weights(path, config)
