"""Slice and quantize to W4A16 (GPTQ, group 128) in one oneshot pass.

The slicer sees the group-wise scheme later in the recipe and rounds every kept width to
a multiple of 128 by itself (576 is not a multiple of 128; sliced widths can be). SmolLM2's
o_proj reads 9 heads x 64 = 576 inputs, which slicing does not change, so it stays in full
precision (the slicer would say so before calibrating if it were targeted), as does layer 0's
input projection from the tied 576-wide table. GPTQ takes the residual shortcut matrices
(quantize_shortcuts) at 4 bits too, for the smallest checkpoint: aligned bases keep them near
the identity, and on SmolLM2 (groups of 64, MSE scales, `rounding: mean`) that cost +6.7%
perplexity against the float model of the same widths. recipes/slice_w4a16.yaml gives 8-bit
shortcuts a config group of their own: 54.64 with the default rounding of dynamic widths
(spectrum, which picks the layers a group rounds up by their signal) against 64.69 with
`rounding: mean` (benchmarks/README.md, "Slice + quantize").
"""

from _common import SAMPLES, SEQ_LEN, smollm2_and_data
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

import dynslice_modifier  # noqa: F401  registers DynamicSliceModifier for YAML recipes
from dynslice_modifier.evaluation import perplexity

RECIPE = """
slice_stage:
  slice_modifiers:
    DynamicSliceModifier: {sparsity: 0.25, slicing_base: 0.05, quantize_shortcuts: true}
quant_stage:
  quant_modifiers:
    GPTQModifier:
      targets: Linear
      scheme: W4A16
      ignore: [lm_head, 're:.*o_proj$', 're:.*input_projection$']
"""

path, tokenizer, dataset, evaluation = smollm2_and_data()
oneshot(
    model=str(path),
    processor=tokenizer,
    dataset=dataset,
    recipe=RECIPE,
    num_calibration_samples=SAMPLES,
    max_seq_length=SEQ_LEN,
    output_dir="out/smollm2-sliced-w4a16",
)
model = AutoModelForCausalLM.from_pretrained("out/smollm2-sliced-w4a16")
print("kept widths:", model.config.slicing["mlp_dims"])
print(f"perplexity of the sliced W4A16 model: {perplexity(model, evaluation):.2f}")
