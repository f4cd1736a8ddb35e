"""Generation speed: our KV cache vs none, and vs Hugging Face's GPT-2 with its own cache.

    python bench/bench_generate.py [--quick] [--threads N]

Threads default to 1: batch-1 decoding of small models is dominated by per-op overhead, and on
a shared 2-vCPU machine 2 intra-op threads made it up to 10x slower and erratic.

(a) a small model (4 layers, 4 heads, width 128, block 256, vocab 2048): prompt 64 -> 256
    tokens, batch 1, greedy; median tokens/s over several rounds, cached vs uncached vs
    transformers' ``GPT2LMHeadModel.generate(use_cache=True)`` with the same weights.
(b) GPT-2 124M shape in fp32, batch 1, cached greedy decode: tokens/s and the memory bandwidth
    that implies (every step reads all weights once), with the peer's tokens/s.
(c) the small model serving 64 prompts of 4 to 40 tokens, 32 new tokens each, greedy: one
    left-padded batch (``complete``) vs a batch per prompt length (the way round padding) vs
    transformers with the same left padding and attention mask.

Both models get identical random weights (ours converted from the peer's), and the script
checks that they produce identical tokens, so the timings compare the same computation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt.generate import complete, generate, left_pad
from minigpt.model import GPT, GPTConfig


def interleaved_medians(fns: dict[str, Callable[[], torch.Tensor]], rounds: int
                        ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median wall time of each function and its output. One warm-up call each, then the
    functions take turns every round, so a burst of load on a shared machine hits all alike."""
    outputs = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def twin_models(n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int
                ) -> tuple[GPT, GPT2LMHeadModel]:
    torch.manual_seed(0)
    hf_config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=block_size,
                           vocab_size=vocab_size, bos_token_id=None, eos_token_id=None)
    theirs = GPT2LMHeadModel(hf_config).eval()
    ours = GPT.from_hf_state_dict(theirs.state_dict(), GPTConfig.from_hf_config(hf_config)).eval()
    return ours, theirs


def hf_greedy(model: GPT2LMHeadModel, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)


def bench(shape: dict[str, int], prompt_len: int, new_tokens: int, rounds: int, uncached: bool
          ) -> dict[str, float]:
    ours, theirs = twin_models(**shape)
    idx = torch.randint(shape["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(1))
    fns = {
        "cached": lambda: generate(ours, idx, new_tokens, temperature=0),
        "uncached": lambda: generate(ours, idx, new_tokens, temperature=0, use_cache=False),
        "hf": lambda: hf_greedy(theirs, idx, new_tokens),
    }
    if not uncached:
        del fns["uncached"]
    times, outputs = interleaved_medians(fns, rounds)
    results = {name: new_tokens / t for name, t in times.items()}
    if uncached:
        assert torch.equal(outputs["uncached"], outputs["cached"]), "cached and uncached tokens differ"
    results["same_tokens_as_hf"] = float(torch.equal(outputs["hf"], outputs["cached"]))
    results["weight_bytes"] = float(sum(p.numel() * p.element_size() for p in ours.parameters()))
    return results


def bench_mixed_lengths(shape: dict[str, int], new_tokens: int, rounds: int) -> dict[str, float]:
    ours, theirs = twin_models(**shape)
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(4, 41, (64,), generator=g).tolist()
    prompts = [torch.randint(shape["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    idx, mask = left_pad(prompts)

    def per_length() -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        for n in sorted(set(lengths)):
            rows = [i for i, p in enumerate(prompts) if len(p) == n]
            new = generate(ours, torch.tensor([prompts[i] for i in rows]), new_tokens, temperature=0)
            for i, ids in zip(rows, new[:, n:].tolist()):
                out[i] = ids
        return out

    def hf() -> list[list[int]]:
        with torch.inference_mode():
            out = theirs.generate(idx, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, use_cache=True, pad_token_id=0)
        return out[:, idx.size(1):].tolist()

    fns = {"padded": lambda: complete(ours, prompts, new_tokens, batch_size=64), "per_length": per_length, "hf": hf}
    times, outputs = interleaved_medians(fns, rounds)
    results = {name: len(prompts) * new_tokens / t for name, t in times.items()}
    assert outputs["padded"] == outputs["per_length"], "padded and per-length batches disagree"
    results["same_tokens_as_hf"] = float(outputs["padded"] == outputs["hf"])
    results["groups"] = float(len(set(lengths)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens (~25 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, fp32, greedy, batch 1")

    small = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=2048)
    r = bench(small, prompt_len=64, new_tokens=192, rounds=rounds, uncached=True)
    print(f"(a) small 4L/4H/128/block256/vocab2048, 64 -> 256 tokens, median of {rounds}: "
          f"cached {r['cached']:.0f} tok/s | uncached {r['uncached']:.0f} tok/s | "
          f"speed-up {r['cached'] / r['uncached']:.1f}x | HF cached {r['hf']:.0f} tok/s | "
          f"ours/HF {r['cached'] / r['hf']:.2f} | same tokens as HF: {bool(r['same_tokens_as_hf'])}")

    gpt2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    new_tokens = 16 if args.quick else 64
    r = bench(gpt2, prompt_len=16, new_tokens=new_tokens, rounds=max(rounds // 2, 1), uncached=False)
    gbytes = r["weight_bytes"] / 1e9
    print(f"(b) GPT-2 124M fp32, 16 -> {16 + new_tokens} tokens, median of {max(rounds // 2, 1)}: "
          f"cached {r['cached']:.1f} tok/s = {gbytes * r['cached']:.1f} GB/s of weights "
          f"({gbytes:.2f} GB/token) | HF cached {r['hf']:.1f} tok/s | ours/HF {r['cached'] / r['hf']:.2f} | "
          f"same tokens as HF: {bool(r['same_tokens_as_hf'])}")

    r = bench_mixed_lengths(small, new_tokens=32, rounds=rounds)
    print(f"(c) small, 64 prompts of 4-40 tokens ({r['groups']:.0f} lengths) + 32 each, median of {rounds}: "
          f"one left-padded batch {r['padded']:.0f} tok/s | a batch per length {r['per_length']:.0f} tok/s | "
          f"speed-up {r['padded'] / r['per_length']:.1f}x | HF padded {r['hf']:.0f} tok/s | "
          f"ours/HF {r['padded'] / r['hf']:.2f} | same tokens as HF: {bool(r['same_tokens_as_hf'])}")


if __name__ == "__main__":
    main()
