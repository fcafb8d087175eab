"""Bounded load test of ``vllm serve`` on loopback for a sliced, quantized checkpoint.

Run with the serving environment::

    .venv-serve/bin/python benchmarks/serve_load.py [--model CHECKPOINT]

The default checkpoint is ``recipes/slice_w8a8.yaml``'s settings as
``benchmarks/quantized.py`` writes them at its default rounding, ``mean``, which the recipe
set when ``results/serve_load.json`` was measured (``benchmarks/vllm_speed.py`` names it
"sliced W8A8 (one basis per layer), shortcuts + sliced head int8"); the recipe now rounds by
``spectrum``, whose checkpoint has that name with ``-spectrum`` appended.

Starts the OpenAI-compatible server, sends every prompt alone (the sequential reference),
then ``--rounds`` rounds of ``--concurrency`` simultaneous completion requests (greedy,
``--max-tokens`` new tokens each). Checks that no request fails and records how many
concurrent completions differ from their sequential reference (a batched kernel may break
a near-tie differently), with latency percentiles and throughput, in
``results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_speed import MODELS, RESULTS, ROOT, cpu_description

RECIPE_MODEL = MODELS["sliced W8A8 (one basis per layer), shortcuts + sliced head int8"][0]


def _post(url: str, payload: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(base: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vllm serve exited with {server.returncode}")
        try:
            urllib.request.urlopen(f"{base}/health", timeout=5)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise SystemExit(f"vllm serve not healthy after {timeout:.0f}s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(RECIPE_MODEL))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=512)
    args = parser.parse_args()

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    cmd += ["--served-model-name", "sliced", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    cmd += ["--gpu-memory-utilization", "0.3", "--max-num-seqs", str(args.concurrency)]
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    (ROOT / "out").mkdir(exist_ok=True)
    log = open(ROOT / "out" / "serve_load.server.log", "w")  # noqa: SIM115  (lives with the server)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)  # fmt: skip
    try:
        start = time.perf_counter()
        _wait_healthy(base, server, 600)
        startup_s = time.perf_counter() - start
        # Distinct prompts: token ids, so the test does not depend on the tokenizer.
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        prompts = [[(37 * i + 11 * j) % (vocab - 10) + 5 for j in range(16 + i % 17)]
                   for i in range(args.concurrency)]  # fmt: skip

        def complete(prompt: list[int]) -> tuple[list[int] | None, float, str | None]:
            payload = {"model": "sliced", "prompt": prompt, "max_tokens": args.max_tokens,
                       "temperature": 0, "ignore_eos": True, "return_token_ids": True}  # fmt: skip
            t0 = time.perf_counter()
            try:
                choice = _post(f"{base}/v1/completions", payload)["choices"][0]
                return choice.get("token_ids"), time.perf_counter() - t0, None
            except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
                return None, time.perf_counter() - t0, f"{type(err).__name__}: {err}"

        sequential = [complete(p) for p in prompts]
        errors = [e for _, _, e in sequential if e]
        rounds = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(complete, prompts))
            wall = time.perf_counter() - t0
            errors += [e for _, _, e in results if e]
            latencies = [t for _, t, e in results if not e]
            rounds.append({
                "wall_s": round(wall, 2),
                "tokens_per_s": round(len(latencies) * args.max_tokens / wall, 1),
                "p50_s": round(percentile(latencies, 0.5), 3),
                "p90_s": round(percentile(latencies, 0.9), 3),
                "p99_s": round(percentile(latencies, 0.99), 3),
                "differs_from_sequential": sum(
                    r[0] != s[0] for r, s in zip(results, sequential, strict=True)
                ),
            })  # fmt: skip
        seq_latency = [t for _, t, e in sequential if not e]
        report = {
            "model": args.model,
            "dtype": args.dtype,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "startup_s": round(startup_s, 1),
            "sequential_p50_s": round(statistics.median(seq_latency), 3),
            "rounds": rounds,
            "errors": errors,
            "machine": cpu_description(),
        }
        (RESULTS / "serve_load.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        if errors:
            raise SystemExit(f"{len(errors)} requests failed: {errors[:3]}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        log.close()


if __name__ == "__main__":
    main()
