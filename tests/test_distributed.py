"""llm-compressor's distributed oneshot (torchrun, 2 CPU processes, gloo) slices exactly as
one process does: covariances, redundancy sums, token counts and held-out losses are summed
over ranks (dynslice_modifier/distributed.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import calib_dataset, save_tiny
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parent / "distributed_oneshot.py"
FIXED = {"sparsity": 0.25, "slicing_base": 0.1, "round_to": 8, "profitable_only": False}


def launch(
    model_dir: Path, out: Path, options: dict, ranks: int, *extra: str
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    launcher = [sys.executable]
    if ranks > 1:
        with socket.socket() as sock:  # a free port, not the default 29500
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
        launcher += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    cmd = [*launcher, str(SCRIPT), str(model_dir), str(out), json.dumps(options), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def run(model_dir: Path, out: Path, options: dict, ranks: int, *extra: str) -> str:
    proc = launch(model_dir, out, options, ranks, *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("dist") / "tiny", "llama", True)


# Spectrum rounding (the default for these dynamic widths) adds a collective per layer (the
# input covariances' sum): every rank must reach it for the run to end with one model, and
# every rank must end up with the spectra of the whole calibration set, not of its own shard.
# slicing_base: auto must hold out the batches one process would: with 5 samples in shards
# of 3 and 2, one batch in all, not one per rank (its widths showed it at round_to 1).
AUTO = {**FIXED, "slicing_base": "auto", "round_to": 1, "rounding": "nearest"}


@pytest.mark.parametrize(
    ("options", "samples"),
    [({**FIXED, "rounding": "mean"}, 16), (FIXED, 16), (AUTO, 5)],
    ids=["mean", "spec", "auto"],
)
def test_two_ranks_give_the_single_process_model(model_dir, tmp_path, options, samples):
    data = ("--samples", str(samples))
    run(model_dir, tmp_path / "single", options, 1, *data)
    run(model_dir, tmp_path / "multi", options, 2, "--shard", *data)
    single = load_file(tmp_path / "single" / "model.safetensors")
    multi = load_file(tmp_path / "multi" / "model.safetensors")
    assert single.keys() == multi.keys()
    for name, tensor in single.items():
        torch.testing.assert_close(multi[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    specs = [json.loads((tmp_path / f"multi.rank{r}.json").read_text()) for r in (0, 1)]
    assert specs[0] == specs[1]
    saved = json.loads((tmp_path / "single" / "config.json").read_text())["slicing"]
    assert specs[0]["lr_scores"] == pytest.approx(saved["lr_scores"], rel=1e-12)
    assert specs[0]["attn_dims"] == saved["attn_dims"]
    if options["slicing_base"] == "auto":
        for got, want in zip(
            specs[0]["slicing_base_search"], saved["slicing_base_search"], strict=True
        ):
            assert got == pytest.approx(want, rel=1e-9)
    assert saved["rounding"] == options.get("rounding", "spectrum")
    if saved["rounding"] == "spectrum":
        spectra = json.loads((tmp_path / "single.spectra.json").read_text())
        for r in (0, 1):
            ranked = json.loads((tmp_path / f"multi.rank{r}.spectra.json").read_text())
            assert len(ranked) == len(spectra) == 1
            for layer, (got, want) in enumerate(zip(ranked[0], spectra[0], strict=True)):
                assert got == pytest.approx(want, rel=1e-9, abs=1e-12 * want[0]), (r, layer)


def test_an_error_on_one_rank_ends_every_rank(model_dir, tmp_path):
    # The other rank is waiting in a collective when one raises; torchrun's agent must end
    # the run with that rank's error, and no rank may save anything.
    proc = launch(model_dir, tmp_path / "fails", FIXED, 2, "--shard", "--fail-rank", "1")
    assert proc.returncode != 0
    assert "CalibrationError: non-finite activations at decoder layer 0" in proc.stderr
    assert "(rank 1)" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_identical_datasets_on_every_rank_are_reported(model_dir, tmp_path):
    log = run(model_dir, tmp_path / "same", FIXED, 2)
    assert "dataset.shard(world_size, rank, contiguous=True)" in log


@pytest.mark.parametrize(
    "options",
    [FIXED, {**FIXED, "slice_head": True}, {**FIXED, "slicing_base": "auto"}],
    ids=["", "head", "auto"],
)
def test_disk_offloaded_model_slices_like_a_loaded_one(model_dir, tmp_path, options):
    """A model accelerate offloaded to disk (every weight on the meta device) goes through
    oneshot, onloaded one layer at a time (and the head, when it is sliced), to the same
    checkpoint as one loaded in memory; ``auto``'s trials slice copies of offloaded layers."""
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session
    from transformers import AutoModelForCausalLM

    from dynslice_modifier import DynamicSliceModifier

    run(model_dir, tmp_path / "loaded", options, 1)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, device_map="auto", max_memory={"cpu": "40KB"}, offload_folder=tmp_path / "off"
    )
    assert all(p.device.type == "meta" for p in model.parameters())
    reset_session()
    oneshot(
        model=model,
        dataset=calib_dataset(),
        recipe=[DynamicSliceModifier(**options)],
        num_calibration_samples=16,
        max_seq_length=32,
        output_dir=str(tmp_path / "offloaded"),
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "loaded")
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "offloaded")
    assert ("final_dim" in offloaded.config.slicing) is ("slice_head" in options)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, loaded(ids).logits, rtol=1e-5, atol=1e-5)


def test_nccl_reductions_run_on_the_accelerator(monkeypatch):
    # On GPUs llm-compressor's process group is NCCL alone, which cannot reduce the CPU
    # tensors that hold token counts and loss sums.
    from dynslice_modifier import distributed

    monkeypatch.setattr(torch.distributed, "get_backend", lambda *_: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert distributed.collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *_: "gloo")
    assert distributed.collective_device() == torch.device("cpu")
