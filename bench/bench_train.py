"""Training speed against transformers' GPT2LMHeadModel of the same shape, interleaved in one run.

Prints one line per figure: tokens/s of each per round and their ratio, the median ratio,
achieved GFLOP/s against a large fp32 matmul measured in the same run, and the peak RSS of one
GPT-2-124M-shaped training step (batch 1, block 256) in a fresh process for each model.

    python bench/bench_train.py [--rounds 9] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt.model import GPT, GPTConfig
from minigpt.train import TrainConfig, make_optimizer

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=2048)
BATCH = 12


def build(kind: str, shape: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "minigpt":
        return GPT(GPTConfig(**shape))
    hf_config = GPT2Config(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                           n_positions=shape["block_size"], vocab_size=shape["vocab_size"],
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(hf_config)


def step_fn(kind: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = model(x, y)[1] if kind == "minigpt" else model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def tokens_per_s(kind: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int,
                 batch: int, block: int) -> float:
    step = step_fn(kind, model, optimizer)
    x = torch.randint(0, SHAPE["vocab_size"], (batch, block))
    step(x, x)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step(x, x)
    return steps * batch * block / (time.perf_counter() - start)


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def peak_rss_child(kind: str) -> None:
    """One 124M-shaped training step (batch 1, block 256); prints peak RSS in MB as JSON."""
    import resource
    shape = dict(n_layer=12, n_head=12, n_embd=768, block_size=256, vocab_size=50257)
    model = build(kind, shape)
    tokens_per_s(kind, model, make_optimizer(model, TrainConfig(), "cpu"), steps=1, batch=1, block=256)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rss-child", choices=["minigpt", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return peak_rss_child(args.rss_child)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; shape {SHAPE}, batch {BATCH}, fp32")
    models = {kind: build(kind, SHAPE) for kind in ("minigpt", "transformers")}
    opts = {kind: make_optimizer(m, TrainConfig(), "cpu") for kind, m in models.items()}
    ratios, ours_all = [], []
    for r in range(args.rounds):
        order = ["minigpt", "transformers"] if r % 2 == 0 else ["transformers", "minigpt"]
        speed = {k: tokens_per_s(k, models[k], opts[k], args.steps, BATCH, SHAPE["block_size"]) for k in order}
        ratios.append(speed["minigpt"] / speed["transformers"])
        ours_all.append(speed["minigpt"])
        print(f"round {r + 1}: minigpt {speed['minigpt']:,.0f} tok/s, transformers "
              f"{speed['transformers']:,.0f} tok/s, ratio {ratios[-1]:.3f}")
    flops_per_token = models["minigpt"].flops_per_token()
    peak = matmul_gflops()
    achieved = statistics.median(ours_all) * flops_per_token / 1e9
    print(f"median ratio minigpt/transformers: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, rounds above 1: {sum(x > 1 for x in ratios)}/{len(ratios)})")
    print(f"minigpt achieved {achieved:.1f} GFLOP/s ({flops_per_token / 1e6:.2f} MFLOP/token); "
          f"2048^3 fp32 matmul {peak:.1f} GFLOP/s; ratio {achieved / peak:.2f}")
    for kind in ("minigpt", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--rss-child", kind], capture_output=True, text=True,
                             check=True).stdout
        print(f"peak RSS, one GPT-2-124M training step (batch 1, block 256), {kind}: "
              f"{json.loads(out.splitlines()[-1])['peak_rss_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
