"""One oneshot run, single-process or as one rank of ``torchrun`` (gloo, CPU).

    python tests/distributed_oneshot.py MODEL_DIR OUT_DIR MODIFIER_JSON [--shard] [--fail-rank R]
        [--samples N]

Under torchrun every rank writes ``OUT_DIR.rank{R}.json`` with the slicing spec it computed
(only rank 0's model is saved), so a test can check that the ranks agreed; a run that
takes the spectra of the layer inputs (spectrum rounding, the default for dynamic widths)
writes them to ``OUT_DIR.spectra.json`` (``OUT_DIR.rank{R}.spectra.json`` under torchrun),
as the widths alone may round the same from one shard's spectra as from all of them.
``--shard`` gives each rank its own contiguous shard of the calibration set, the workaround
for llm-compressor 0.14 handing every rank the same samples. ``--fail-rank R`` makes rank R
alone find non-finite activations in the first layer, as a rank whose shard holds a bad
sample would. ``--samples N`` calibrates on N samples (16 unless given).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import calib_dataset
from llmcompressor import oneshot

from dynslice_modifier import DynamicSliceModifier
from dynslice_modifier import modifier as modifier_module
from dynslice_modifier.errors import CalibrationError
from dynslice_modifier.redundancy import DensePass, dense_pass

SPECTRA: list[list[list[float]]] = []


def recording_dense_pass(*args, **kwargs) -> DensePass:
    measured = dense_pass(*args, **kwargs)
    if measured.spectra is not None:
        SPECTRA.append(measured.spectra)
    return measured


def main() -> None:
    model_dir, out_dir, options = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    if "--fail-rank" in sys.argv:
        failing = int(sys.argv[sys.argv.index("--fail-rank") + 1])
        if dist.is_initialized() and dist.get_rank() == failing:
            import dynslice_modifier.slicer

            def non_finite(tensor, where):
                raise CalibrationError(f"non-finite activations at {where} (rank {failing})")

            dynslice_modifier.slicer.check_finite = non_finite
    modifier_module.dense_pass = recording_dense_pass
    samples = int(sys.argv[sys.argv.index("--samples") + 1]) if "--samples" in sys.argv else 16
    data = calib_dataset(samples)
    if "--shard" in sys.argv and dist.is_initialized():
        data = data.shard(dist.get_world_size(), dist.get_rank(), contiguous=True)
    model = oneshot(
        model=model_dir,
        dataset=data,
        recipe=[DynamicSliceModifier(**options)],
        num_calibration_samples=len(data),
        max_seq_length=32,
        output_dir=str(out_dir),
        shuffle_calibration_samples=False,
    )
    rank = f".rank{dist.get_rank()}" if dist.is_initialized() else ""
    if SPECTRA:
        Path(f"{out_dir}{rank}.spectra.json").write_text(json.dumps(SPECTRA))
    if dist.is_initialized():
        spec = {k: v for k, v in model.config.slicing.items() if k != "source_model"}
        Path(f"{out_dir}{rank}.json").write_text(json.dumps(spec))
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
