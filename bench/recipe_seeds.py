"""A recipe's chapter targets at one seed: every stage from nothing, in a model cache of its own.

The book quotes one run of each stage; a target counts only where every seed meets it. This
script runs the chain that chapters 4 to 6 build (pretraining, full SFT, LoRA, the reward model,
PPO, DPO + NLL and GRPO) at one seed and thread count and prints each outcome against its target.

    OMP_NUM_THREADS=1 python bench/recipe_seeds.py --profile cpu --seed 2 [--out runs/seeds] [--skip lora]

Each (profile, seed, threads) gets its own folder under ``--out`` (cache and stage runs), and
the last line is the outcomes as JSON, for a table over seeds. Takes ~30 minutes at ``cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: Each chapter's target: (outcome, comparison, bound); ``lora_gap`` is full SFT minus LoRA.
TARGETS: list[tuple[str, str, float]] = [
    ("pretrain_nats_per_byte", "<=", 1.9),
    ("sft_exact_match", ">=", 0.9),
    ("lora_gap", "<=", 0.05),
    ("reward_pair_accuracy", ">", 0.95),
    ("ppo_true_reward_gain", ">=", 0.3),
    ("ppo_kl", "<", 5.0),
    ("dpo_pair_accuracy", ">=", 0.85),
    ("dpo_exact_match_minus_start", ">=", 0.0),
    ("grpo_exact_match_gain", ">=", 0.15),
    ("grpo_kl", "<", 1.0),
]
#: Every stage but pretraining and full SFT, which the others start from.
_SKIPPABLE = ("lora", "reward", "ppo", "dpo", "grpo")
_OPS: dict[str, Callable[[float, float], bool]] = {"<=": float.__le__, ">=": float.__ge__, "<": float.__lt__,
                                                   ">": float.__gt__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cpu")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default="runs/seeds", help="parent folder of this seed's cache and runs")
    p.add_argument("--skip", nargs="*", default=[], choices=_SKIPPABLE,
                   help="stages left out, with their outcomes (ppo goes with reward): those a change leaves alone")
    args = p.parse_args()
    threads = torch.get_num_threads()
    folder = Path(args.out) / f"{args.profile}-seed{args.seed}-threads{threads}"
    os.environ["MINIGPT_CACHE"] = str((folder / "cache").resolve())  # before minigpt reads it

    import minigpt
    from minigpt.rlhf.run import run_dpo, run_grpo, run_ppo, run_reward
    from minigpt.runs import find_or_make, open_run
    from minigpt.sft import sft

    r = minigpt.recipe(args.profile, seed=args.seed)
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[{name}: {seconds[name]:.0f} s]", flush=True)
        return result

    pre = timed("pretrain", lambda: open_run(find_or_make(r, "pretrain")))
    full = timed("sft", lambda: open_run(find_or_make(r, "sft")))
    sft_em = full.info.extra["exact_match"]
    got = {"pretrain_nats_per_byte": [h for h in pre.history if "val_nats_per_byte" in h][-1]["val_nats_per_byte"],
           "sft_exact_match": sft_em}
    if "lora" not in args.skip:
        lora = timed("lora", lambda: sft(r, None, folder / "lora", lora=True, progress=False))
        got.update(lora_exact_match=lora.exact_match, lora_gap=sft_em - lora.exact_match)
    if "reward" not in args.skip:
        rm = timed("reward", lambda: run_reward(r, folder / "reward"))
        got.update(reward_pair_accuracy=rm.summary["pair_accuracy"])
        if "ppo" not in args.skip:  # PPO optimises against that reward model
            ppo = timed("ppo", lambda: run_ppo(r, folder / "ppo", rm.model)).summary
            got.update(ppo_true_reward_before=ppo["true_reward_before"],
                       ppo_true_reward_gain=ppo["true_reward_after"] - ppo["true_reward_before"], ppo_kl=ppo["kl"])
    if "dpo" not in args.skip:
        dpo = timed("dpo", lambda: run_dpo(r, folder / "dpo")).summary
        got.update(rl_start_exact_match=dpo["exact_match_before"], dpo_pair_accuracy=dpo["pair_accuracy"],
                   dpo_exact_match=dpo["exact_match"],
                   dpo_exact_match_minus_start=dpo["exact_match"] - dpo["exact_match_before"])
    if "grpo" not in args.skip:
        grpo = timed("grpo", lambda: run_grpo(r, folder / "grpo")).summary
        got.update(rl_start_exact_match=grpo["exact_match_before"],
                   grpo_sampled_before=grpo["sampled_accuracy_before"],
                   grpo_sampled_gain=grpo["sampled_accuracy"] - grpo["sampled_accuracy_before"],
                   grpo_exact_match_gain=grpo["exact_match"] - grpo["exact_match_before"], grpo_kl=grpo["kl"])
    print(f"\n{args.profile}, seed {args.seed}, {threads} thread(s)")
    for name, value in got.items():
        target = next(((op, bound) for n, op, bound in TARGETS if n == name), None)
        verdict = "" if target is None else f"  target {target[0]} {target[1]:<5}  " + (
            "ok" if _OPS[target[0]](float(value), target[1]) else "MISSED")
        print(f"{name:>28} = {value:8.4f}{verdict}")
    print(json.dumps({"profile": args.profile, "seed": args.seed, "threads": threads, "outcomes": got,
                      "seconds": seconds}))


if __name__ == "__main__":
    main()
