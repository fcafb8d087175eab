"""The checkpoint report reads what the config records, layer by layer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dynslice_modifier.report import plot_slicing, summary_markdown

SEARCH = [
    {"slicing_base": 0.05, "sparsity": 0.25, "heldout_nll": 3.2, "chosen": True},
    {"slicing_base": 0.1, "sparsity": 0.25, "heldout_nll": 3.3, "chosen": False},
]


def write_checkpoint(directory: Path, **slicing) -> Path:
    spec = {
        "attn_dims": [48, 32, 64],
        "mlp_dims": [40, 32, 64],
        "attn_shortcuts": [True, False, False],
        "mlp_shortcuts": [True, True, False],
        "embedding_sliced": False,
        "sparsity": 0.25,
        "slicing_base": 0.05,
        "round_to": 8,
        "rounding": "spectrum",
        "basis": "sublayer",
    } | slicing
    config = {
        "model_type": "dynslice",
        "base_model_type": "llama",
        "num_hidden_layers": 3,
        "hidden_size": 64,
        "tie_word_embeddings": True,
        "slicing": spec,
    }
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(bytes(3 * 2**20))
    return directory


def test_the_layer_table_has_a_row_per_layer_as_recorded(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ck", lr_scores=[0.9123, 0.8, 0.95])
    report = summary_markdown(checkpoint)
    assert report.startswith("# Sliced checkpoint: ck\n")
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "| 0 | 0.912 | 48 | 40 | yes | yes |",
        "| 1 | 0.800 | 32 | 32 | no | yes |",
        "| 2 | 0.950 | 64 | 64 | no | no |",
    ]
    assert "- mean kept width 45.3 of 64" in report
    assert "round_to 8 (spectrum rounding)" in report
    assert "- size on disk: 3.0 MiB, this report aside" in report
    # A report written before (1 MiB here) does not count: writing it again states the same.
    (checkpoint / "slicing_report.md").write_bytes(bytes(2**20))
    assert "- size on disk: 3.0 MiB, this report aside" in summary_markdown(checkpoint)
    assert "basis sublayer\n" in report
    # Nothing recorded, nothing claimed.
    assert "parameters:" not in report and "quantization:" not in report
    assert "calibration:" not in report
    assert "search" not in report


def test_scores_parameters_quantization_and_the_search_when_recorded(tmp_path):
    checkpoint = write_checkpoint(
        tmp_path / "ck",
        parameters={"sliced": 1.5e6, "dense": 2e6},
        calibration={"batches": 64, "tokens": 32768},
        slicing_base_search=SEARCH,
        quantizable_shortcuts=True,
        final_dim=32,
        basis="layer",
        layers_per_basis=2,
    )
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {
        "format": "pack-quantized",
        "quant_method": "compressed-tensors",
    }
    (checkpoint / "config.json").write_text(json.dumps(config))
    report = summary_markdown(checkpoint, name="final-name")
    assert report.startswith("# Sliced checkpoint: final-name\n")
    # No scores recorded (layer_dims given): the column stays empty.
    assert "| 0 |  | 48 | 40 | yes | yes |" in report
    assert "- calibration: 64 batches, 32768 tokens (padding excluded)" in report
    assert "- parameters: 1.50M vs 2.00M dense (75.0%)" in report
    assert "head reads 32 of 64 (slice_head: True)" in report
    assert "basis layer (2 layers per basis where of one width)\n" in report
    assert "pack-quantized (compressed-tensors); shortcut matrices quantized" in report
    search = report.split("`slicing_base: auto` search")[1].splitlines()
    assert search[-2:] == [
        f"| 0.0500 | 0.2500 | 3.2000 | {math.exp(3.2):.2f} | yes |",
        f"| 0.1000 | 0.2500 | 3.3000 | {math.exp(3.3):.2f} |  |",
    ]


def test_a_solved_sparsity_is_shown_rounded_with_its_target(tmp_path):
    checkpoint = write_checkpoint(
        tmp_path / "ck",
        sparsity=0.3046875000006821,
        slicing_base=0.060937500000136424,
        target_params=0.2,
    )
    report = summary_markdown(checkpoint)
    assert (
        "- sparsity (SP) 0.3047 (solved for target_params 0.2), slicing base (SB) 0.06094, "
        in report
    )


def test_a_dense_checkpoint_is_refused(tmp_path):
    directory = tmp_path / "dense"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(
        ValueError, match=r"not a sliced checkpoint .*; slice it first with: dynslice compress"
    ):
        summary_markdown(directory)


def test_a_damaged_config_is_named_with_the_fix(tmp_path):
    from dynslice_modifier.modeling import SlicingConfigError

    checkpoint = write_checkpoint(tmp_path / "ck")
    config = json.loads((checkpoint / "config.json").read_text())
    del config["slicing"]["mlp_dims"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlicingConfigError, match=r"slicing\.mlp_dims must be a list of 3"):
        summary_markdown(checkpoint)
    del config["slicing"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlicingConfigError, match=r"config\.json lacks its slicing section"):
        summary_markdown(checkpoint)
    for text, problem in (("[]", "holds no JSON object"), ("{'a': 1}", "is not valid JSON")):
        (checkpoint / "config.json").write_text(text)
        with pytest.raises(ValueError, match=rf"config\.json {problem}.*save the model again"):
            summary_markdown(checkpoint)


@pytest.mark.parametrize("basis", ["sublayer", "layer"])
def test_the_plot_draws_the_recorded_widths_and_scores(tmp_path, monkeypatch, basis):
    import matplotlib.figure

    drawn = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "savefig",
        lambda fig, *args, **kwargs: (drawn.append(fig), save(fig, *args, **kwargs)),
    )
    widths = {} if basis == "sublayer" else {"attn_dims": [40, 32, 64], "basis": "layer"}
    checkpoint = write_checkpoint(tmp_path / "ck", lr_scores=[0.9, 0.8, 0.95], **widths)
    png = plot_slicing(checkpoint, tmp_path / "plot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    (fig,) = drawn
    lines = {line.get_label(): list(line.get_ydata()) for ax in fig.axes for line in ax.get_lines()}
    expected = {"constant slicing (48)": [48, 48], "Layer Redundancy": [0.9, 0.8, 0.95]}
    if basis == "sublayer":
        expected |= {"attention input width": [48, 32, 64], "MLP input width": [40, 32, 64]}
    else:
        expected |= {"kept width (dynamic)": [40, 32, 64]}
    assert lines == expected
