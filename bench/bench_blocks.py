"""The modern-block race of chapter 9 at a budget the chapter cannot afford, for several seeds.

The chapter races the variants for 100 small steps, where they are still learning which tokens
are frequent; this runs the same :func:`minigpt.blocks.compare_blocks` longer and repeats it
over seeds, so a difference can be told from seed noise. Prints each seed's table and, per
variant, the mean and spread of its loss minus GPT-2's.

    python bench/bench_blocks.py [--profile cpu] [--steps 400] [--batch-size 8] [--seeds 1337 1338]
"""

from __future__ import annotations

import argparse
import statistics

import minigpt
from minigpt.blocks import compare_blocks, format_table
from minigpt.recipe import override


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    args = parser.parse_args()
    recipe = minigpt.recipe(args.profile, {"blocks.steps": args.steps, "blocks.batch_size": args.batch_size})
    block = recipe.model.block_size
    tokens = args.steps * args.batch_size * block
    print(f"{recipe.name}: {args.steps} steps of {args.batch_size} x {block} tokens "
          f"({tokens / 1e6:.2f}M tokens per variant), seeds {args.seeds}")
    gaps: dict[str, list[float]] = {}
    for seed in args.seeds:
        runs = compare_blocks(override(recipe, {"seed": seed}), evals=4)
        print(f"\nseed {seed}\n{format_table(runs)}", flush=True)
        for r in runs[1:]:
            gaps.setdefault(r.name, []).append(r.val_loss - runs[0].val_loss)
    print(f"\nval loss minus GPT-2's over {len(args.seeds)} seeds (negative: better than GPT-2)")
    for name, g in gaps.items():
        spread = f"  range {min(g):+.3f} .. {max(g):+.3f}" if len(g) > 1 else ""
        print(f"{name:<12} mean {statistics.mean(g):+.3f}{spread}")


if __name__ == "__main__":
    main()
