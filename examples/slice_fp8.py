"""Slice and quantize to FP8 (dynamic per-token activations; data-free weights)."""

from _common import SAMPLES, SEQ_LEN, smollm2_and_data
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

from dynslice_modifier import DynamicSliceModifier

path, tokenizer, dataset, _ = smollm2_and_data()
recipe = [
    DynamicSliceModifier(sparsity=0.25, slicing_base=0.05),
    QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]),
]
oneshot(
    model=str(path),
    processor=tokenizer,
    dataset=dataset,
    recipe=recipe,
    num_calibration_samples=SAMPLES,
    max_seq_length=SEQ_LEN,
    output_dir="out/smollm2-sliced-fp8",
)
print("wrote out/smollm2-sliced-fp8 (serve it on a GPU with FP8 support: vllm serve ...)")
