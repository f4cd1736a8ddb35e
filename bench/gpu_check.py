"""Does the full-scale path start on this machine, and how fast is it? One script for a lent GPU.

    python bench/gpu_check.py              # a GPU: the `full` model (GPT-2 124M), micro-batch 64 x 1024
    python bench/gpu_check.py --cpu        # a tiny model on the CPU in seconds (CI runs this mode)

It runs the real :class:`~minigpt.train.Trainer` on synthetic token shards, eager and then
compiled, and prints one JSON object: the attention kernel SDPA picked, compile time, median step
time, tokens/s, MFU by two formulas, peak memory in training and in evaluation, and the time of an
evaluation, a checkpoint and a 100-token sample, and the number of graphs ``torch.compile`` made.
With two or more GPUs (or ``--cpu``: two gloo processes) it also runs 2 processes under
``torchrun``, with DDP and with FSDP (``--parallel fsdp``). On one H100 it finishes in a few minutes; give it 8.

MFU (model FLOPs utilisation) = achieved training FLOP/s / the device's dense peak in the autocast
dtype (:func:`minigpt.train.peak_flops`; none for a CPU or a GPU it does not know). Two FLOP
counts, because published figures use both:

* ``mfu``: :meth:`minigpt.model.GPT.flops_per_token`, 6N + 12LHQT with N the parameters less the
  position embedding (nanoGPT and PaLM's appendix B);
* ``mfu_llmc``: llm.c's 6N + 6LCT with N every parameter (its attention term counts the causal
  half only), about 6% lower for GPT-2 124M at T = 1024.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig
from minigpt.shards import ShardLoader, write_shard
from minigpt.train import Distributed, TrainConfig, Trainer, autocast_dtype, init_distributed, peak_flops

# The GPU check: GPT-2 124M with the `full` recipe's vocabulary and micro-batch. The CPU mode: a
# model small enough that every part runs in seconds on 2 cores.
GPU = dict(model=GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304), batch=64, steps=20)
CPU = dict(model=GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=512), batch=4, steps=4)
WARMUP = 3  # steps left out of the median: the first compiles, autotunes and fills allocators


def synthetic_shard(folder: Path, cfg: GPTConfig, tokens: int, seed: int = 0) -> Path:
    """A shard of uniformly random token ids: the step's cost does not depend on the text."""
    rng = np.random.default_rng(seed)
    return write_shard(folder / "synthetic.bin", rng.integers(0, cfg.vocab_size, tokens, dtype=np.uint32))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def attention_kernels(model: GPT, device: str, dtype: str, batch: int) -> list[str]:
    """The scaled-dot-product-attention ops one forward pass runs (flash, efficient or math)."""
    x = torch.randint(0, model.config.vocab_size, (batch, model.config.block_size), device=device)
    amp = autocast_dtype(dtype, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None), \
            torch.profiler.profile(activities=activities) as prof:
        model(x)
        sync(device)
    return sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "flash" in e.key.lower()})


def timed_training(model: GPT, cfg: TrainConfig, loader: ShardLoader, device: str, steps: int,
                   ddp: Distributed | None = None) -> tuple[Trainer, dict[str, Any]]:
    """``WARMUP + steps`` optimizer steps through the Trainer; the first step's and the median
    step's seconds, tokens/s, and the peak memory they took."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(model, cfg, loader, device=device, ddp=ddp or Distributed())
    seconds, tokens_per_s = [], []
    for _ in range(WARMUP + steps):
        start = time.perf_counter()
        record = trainer.train_step()
        seconds.append(time.perf_counter() - start)
        tokens_per_s.append(record["tokens_per_s"])
    result = {"first_step_s": seconds[0], "median_step_s": statistics.median(seconds[WARMUP:]),
              "tokens_per_s": statistics.median(tokens_per_s[WARMUP:]), "final_loss": record["loss"]}
    if device.startswith("cuda"):
        result["peak_train_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return trainer, result


def check_one(args: argparse.Namespace, device: str, folder: Path) -> dict[str, Any]:
    """Eager and compiled training, then evaluation, checkpoint and sampling, on one device."""
    size = CPU if args.cpu else GPU
    gcfg, batch, steps = size["model"], size["batch"], args.steps or size["steps"]
    shard = synthetic_shard(folder, gcfg, batch * gcfg.block_size * 8 + 1)
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "model": dataclasses.asdict(gcfg) | {"batch": batch},
                              "peak_tflops": peak / 1e12 if peak else None}
    torch.manual_seed(0)
    model = GPT(gcfg)
    report["params"] = model.num_params()
    report["attention_kernels"] = attention_kernels(model.to(device), device, args.dtype, min(batch, 4))
    report["flash"] = any("flash" in k.lower() for k in report["attention_kernels"])
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    trainer = None
    for mode in modes:
        del trainer  # the eager run's weights and optimizer state must not count in the compiled run's memory
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        model = GPT(gcfg)
        cfg = TrainConfig(max_steps=10**6, warmup_steps=10, dtype=args.dtype, compile=mode == "compiled",
                          eval_steps=args.eval_steps, checkpoint_interval=0, eval_interval=0)
        if mode == "compiled":
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
        trainer, result = timed_training(model, cfg, ShardLoader([shard], batch, gcfg.block_size), device, steps)
        result["compile_s"] = result["first_step_s"] - result["median_step_s"] if mode == "compiled" else 0.0
        for key, flops in (("mfu", model.flops_per_token()), ("mfu_llmc", model.flops_per_token_llmc())):
            # The Trainer's own peak: the device's, and only where the matmuls run in half precision.
            result[key] = flops * result["tokens_per_s"] / trainer.peak_flops if trainer.peak_flops else None
        if mode == "compiled":
            result["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            result["recompiles"] = sum(torch._dynamo.utils.counters["recompiles"].values())
        report[mode] = result
    # Evaluation, checkpoint and sampling, with the last trainer (compiled where it was).
    trainer.val_data = ShardLoader([shard], batch, gcfg.block_size)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.evaluate()
    report["eval_s"] = time.perf_counter() - start  # evaluate() waits for its .item()
    report["eval_batches"] = cfg.eval_steps
    if device.startswith("cuda"):
        report["peak_eval_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    trainer.out_dir = folder / "run"
    start = time.perf_counter()
    trainer.save()
    report["checkpoint_s"] = time.perf_counter() - start
    report["checkpoint_mb"] = trainer.checkpoint_path.stat().st_size / 1e6
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    start = time.perf_counter()
    out = generate(trainer.raw_model, prompt, 100, temperature=1.0, generator=torch.Generator(device).manual_seed(0))
    sync(device)
    report["sample_100_tokens_s"] = time.perf_counter() - start
    assert out.shape == (1, 101), out.shape
    return report


def ddp_worker(args: argparse.Namespace) -> None:
    """One rank of the 2-process DDP check (started by :func:`check_ddp` under torchrun)."""
    ddp, device = init_distributed("cpu" if args.cpu else "cuda")
    size = CPU if args.cpu else GPU
    gcfg, batch, steps = size["model"], size["batch"], args.steps or size["steps"]
    folder = Path(args.folder)
    shard = folder / "synthetic.bin"
    if ddp.is_main:
        synthetic_shard(folder, gcfg, batch * gcfg.block_size * ddp.world_size * 8 + 1)
    torch.distributed.barrier()
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=10**6, warmup_steps=10, dtype=args.dtype, compile=not args.no_compile and not args.cpu,
                      checkpoint_interval=0, eval_interval=0, parallel=args.parallel)
    loader = ShardLoader([shard], batch, gcfg.block_size, rank=ddp.rank, world_size=ddp.world_size)
    _, result = timed_training(GPT(gcfg), cfg, loader, device, steps, ddp)
    if ddp.is_main:
        print("DDP_RESULT " + json.dumps(result | {"processes": ddp.world_size, "compiled": cfg.compile,
                                                   "parallel": cfg.parallel}), flush=True)
    torch.distributed.destroy_process_group()


def check_ddp(args: argparse.Namespace, folder: Path, parallel: str) -> dict[str, Any] | str:
    """2 processes through torchrun with ``parallel`` (ddp or fsdp): the result, or why it did not run."""
    if not args.cpu and torch.cuda.device_count() < 2:
        return f"skipped: {torch.cuda.device_count()} GPU(s)"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--ddp-worker", "--folder", str(folder), "--dtype", args.dtype, "--parallel", parallel,
               *(["--cpu"] if args.cpu else []),
               *(["--no-compile"] if args.no_compile else []), *(["--steps", str(args.steps)] if args.steps else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("DDP_RESULT "):
            return json.loads(line.removeprefix("DDP_RESULT "))
    return f"failed (exit {proc.returncode}): " + (proc.stderr or proc.stdout)[-2000:]


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny model on the CPU (CI)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps after the warm-up (default: by mode)")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--dtype", default="auto", help="the Trainer's dtype (auto: bf16 where the GPU has it)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return None
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --cpu for the small CPU check")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = check_one(args, "cpu" if args.cpu else "cuda", Path(tmp))
        for parallel in ("ddp", "fsdp"):
            (Path(tmp) / parallel).mkdir()
            report[parallel] = check_ddp(args, Path(tmp) / parallel, parallel)
    report["total_s"] = time.perf_counter() - start
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
