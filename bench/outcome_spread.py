"""The spread behind every outcome bound: the ``outcome`` tests over seeds and thread counts.

The same code trains to other numbers on another CPU (other SIMD kernels, other reduction
orders). The thread count changes the reduction order too, so runs at 1 and 2 threads over
several seeds stand in for other machines. Each run is ``pytest -m outcome`` in its own model
cache, recording every checked value without failing (``MINIGPT_OUTCOMES_RECORD_ONLY``); the
table then gives each outcome's bound, its worst value and whether every run cleared it.

    python bench/outcome_spread.py [--seeds 1337 1 2] [--threads 1 2] [--jobs 2] [-k continual]

A bound is kept only where the worst run clears it with a margin; the tests' comments quote
the range printed here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(seed: int, threads: int, out: Path, select: str | None) -> tuple[int, int, float, int]:
    """One ``pytest -m outcome`` run at ``seed`` and ``threads``; its checks go to ``out``."""
    env = {**os.environ, "MINIGPT_TEST_SEED": str(seed), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "MINIGPT_OUTCOMES": str(out), "MINIGPT_OUTCOMES_RECORD_ONLY": "1",
           "MINIGPT_PROFILE": "ci"}
    env.pop("MINIGPT_TEST_CACHE", None)  # a fresh cache per run: cached models would hide the thread count
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests"), "-m", "outcome", "-q", "-p", "no:cacheprovider",
           *(["-k", select] if select else [])]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
    return seed, threads, time.perf_counter() - start, proc.returncode


def table(rows: list[dict]) -> str:
    """Each outcome: its bound, every run's value, the worst and whether all cleared the bound."""
    by_name: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_name[r["name"]].append(r)
    lines = []
    for name, found in by_name.items():
        op, bound = found[0]["op"], found[0]["bound"]
        values = sorted(r["value"] for r in found)
        worst = values[-1] if op in ("<", "<=") else values[0]
        ok = all({"<": v < bound, "<=": v <= bound, ">": v > bound, ">=": v >= bound}[op] for v in values)
        runs = " ".join(f"{r['seed']}/{r['threads']}t:{r['value']:.3f}" for r in sorted(
            found, key=lambda r: (r["seed"], r["threads"])))
        lines.append(f"{'ok  ' if ok else 'FAIL'} {name}: {op} {bound:g} | range {values[0]:.3f} .. {values[-1]:.3f} "
                     f"| worst {worst:.3f} | {runs}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (their threads add up)")
    parser.add_argument("-k", dest="select", help="only the outcome tests pytest -k selects")
    parser.add_argument("--out", type=Path, help="keep the recorded checks (JSON lines) here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="outcomes-")) / "outcomes.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    configs = [(s, t) for t in args.threads for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        for seed, threads, seconds, rc in pool.map(lambda c: run_once(*c, out, args.select), configs):
            print(f"seed {seed}, {threads} thread(s): {seconds:.0f} s, pytest exit {rc}", flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    print(f"\n{len(rows)} checks from {len(configs)} runs (seed/threads:value), recorded in {out}\n{table(rows)}")


if __name__ == "__main__":
    main()
