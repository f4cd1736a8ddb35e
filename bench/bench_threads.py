"""Two jobs on one thread each, or one job on two threads: which does more training per second?

The book's chapters run one after another, each on every core. This measures whether running two
at once, one thread each, would build the book sooner: ms per training step of the `cpu` recipe's
model at its pretraining shape and at an SFT shape, on 1 thread, on 2 threads, and as two 1-thread
processes started together. Run it on an otherwise idle machine.

    python bench/bench_threads.py [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SHAPES = {"pretraining": (16, 128), "sft": (64, 24)}  # (rows, tokens): R.pretrain.batch_size x block; R.sft.batch_size x a sum


def one_job(shape: str, steps: int) -> float:
    """ms per AdamW step of the `cpu` recipe's model on ``shape``, on the threads the environment allows."""
    import torch

    import minigpt
    from minigpt.model import GPT, GPTConfig
    from minigpt.train import TrainConfig, make_optimizer

    R = minigpt.recipe("cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_recipe(R, vocab_size=R.tokenizer.vocab_size))
    optimizer = make_optimizer(model, TrainConfig.from_recipe(R, max_steps=steps), "cpu")
    rows, tokens = SHAPES[shape]
    x = torch.randint(0, R.tokenizer.vocab_size, (rows, tokens))

    def step() -> None:
        model(x, x)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - start) / steps


def launch(shape: str, steps: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, __file__, "--job", shape, "--steps", str(steps)], env=env,
                            stdout=subprocess.PIPE, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--job", choices=sorted(SHAPES), help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.job:
        print(f"{one_job(args.job, args.steps):.1f}")
        return
    for shape in SHAPES:
        alone = {n: float(launch(shape, args.steps, n).communicate()[0]) for n in (1, 2)}
        pair = [float(p.communicate()[0]) for p in [launch(shape, args.steps, 1) for _ in range(2)]]
        per_second_pair = sum(1000 / ms for ms in pair)
        print(f"{shape}: 1 thread {alone[1]:.0f} ms/step; 2 threads {alone[2]:.0f} ms ({alone[1] / alone[2]:.2f}x); "
              f"two 1-thread jobs at once {pair[0]:.0f} and {pair[1]:.0f} ms: "
              f"{per_second_pair * alone[2] / 1000:.2f}x the steps per second of one job on 2 threads")


if __name__ == "__main__":
    main()
