"""Dynamic slicing alone: SmolLM2-135M at SP 0.25, then perplexity and a reload check."""

from _common import SAMPLES, SEQ_LEN, smollm2_and_data
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

from dynslice_modifier import DynamicSliceModifier
from dynslice_modifier.evaluation import perplexity

path, tokenizer, dataset, evaluation = smollm2_and_data()
recipe = [DynamicSliceModifier(sparsity=0.25, slicing_base=0.05)]
model = oneshot(
    model=str(path),
    processor=tokenizer,
    dataset=dataset,
    recipe=recipe,
    num_calibration_samples=SAMPLES,
    max_seq_length=SEQ_LEN,
    output_dir="out/smollm2-sliced",
)
print("kept widths:", model.config.slicing["mlp_dims"])
print(
    f"perplexity: dense {perplexity(AutoModelForCausalLM.from_pretrained(path), evaluation):.2f}"
    f" -> sliced {perplexity(model, evaluation):.2f}"
)
reloaded = AutoModelForCausalLM.from_pretrained("out/smollm2-sliced")
prompt = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
print(tokenizer.decode(reloaded.generate(**prompt, max_new_tokens=8, do_sample=False)[0]))
