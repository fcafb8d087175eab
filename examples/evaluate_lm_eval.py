"""Evaluate a sliced checkpoint with lm-eval, on the local tasks this package ships.

    python examples/evaluate_lm_eval.py [CHECKPOINT]     # default: out/smollm2-sliced

CHECKPOINT is what ``examples/slice_only.py`` (or ``dynslice compress``) wrote. The same run
from the command line (``trust_remote_code`` lets lm-eval load the sliced architecture
without importing this package):

    lm_eval --model hf --model_args pretrained=out/smollm2-sliced,trust_remote_code=True \\
        --include_path dynslice_modifier/lm_eval_tasks \\
        --tasks wikitext2_local,wikitext2_lastword --batch_size 1

(from the repository root; for an installed package the directory is
``dynslice_modifier.evaluation.LM_EVAL_TASKS``). In the vLLM environment, ``--model vllm``
serves the same checkpoint through the plugin.
``DYNSLICE_EXAMPLE_LIMIT`` caps the documents per task (CPU runs; unset = all).
"""

import os
import sys
from pathlib import Path

import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import dynslice_modifier  # noqa: F401  registers the sliced architecture with transformers
from dynslice_modifier.evaluation import LM_EVAL_TASKS

checkpoint = Path(sys.argv[1] if len(sys.argv) > 1 else "out/smollm2-sliced")
if not (checkpoint / "config.json").exists():
    sys.exit(f"{checkpoint} is not a model directory: run examples/slice_only.py first")
limit = os.environ.get("DYNSLICE_EXAMPLE_LIMIT")

device = "cuda" if torch.cuda.is_available() else "cpu"
lm = HFLM(
    pretrained=str(checkpoint), backend="causal", batch_size=1, max_length=1024, device=device
)
results = simple_evaluate(
    model=lm,
    tasks=["wikitext2_local", "wikitext2_lastword"],
    task_manager=TaskManager(include_path=str(LM_EVAL_TASKS)),
    limit=int(limit) if limit else None,
)["results"]
wiki, cloze = results["wikitext2_local"], results["wikitext2_lastword"]
print(f"wikitext2_local: word perplexity {wiki['word_perplexity,none']:.2f}")
print(
    f"wikitext2_lastword: accuracy {cloze['acc,none']:.3f}, "
    f"perplexity {cloze['perplexity,none']:.1f}"
)
