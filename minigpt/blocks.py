"""GPT-2's block against the modern one, switch by switch, at equal compute (chapter 9).

Each variant is the same :class:`~minigpt.model.GPT` with some of its four switches turned
(``norm``, ``mlp``, ``position``, ``n_kv_head``), trained from the same seed for the same steps
on the same batches (the recipe's corpus, read in order by a fresh
:class:`~minigpt.shards.ShardLoader`), with the same optimiser settings, and evaluated on the
same validation batches. Parameters and FLOPs per token are reported next to the losses, so
"equal compute" can be checked rather than assumed: SwiGLU's hidden width keeps the MLP within
a few percent of GPT-2's, RoPE drops the position table, and grouped-query attention has fewer
key/value weights (that is its point).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from minigpt.model import GPT, GPTConfig
from minigpt.pretrain import model_vocab_size, prepare_data
from minigpt.recipe import Recipe
from minigpt.runs import find_or_make
from minigpt.shards import ShardLoader
from minigpt.train import TrainConfig, Trainer


def variants(n_head: int) -> dict[str, dict[str, Any]]:
    """The comparison's variants as :class:`~minigpt.model.GPTConfig` overrides: GPT-2, each
    switch alone, and all four together. Grouped-query attention halves the key/value heads, or
    keeps the largest number below half that divides ``n_head`` (one head for all queries,
    multi-query attention, when ``n_head`` is 2 or a prime)."""
    gqa = {"n_kv_head": max(g for g in range(1, max(1, n_head // 2) + 1) if n_head % g == 0)}
    return {
        "GPT-2": {},
        "RMSNorm": {"norm": "rmsnorm"},
        "SwiGLU": {"mlp": "swiglu"},
        "RoPE": {"position": "rope"},
        "GQA": gqa,
        "Llama-style": {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", **gqa},
    }


@dataclass
class BlockRun:
    """One trained variant: what it costs and how well it predicts held-out text."""

    name: str
    overrides: dict[str, Any]
    params: int  # GPT.num_params(): without a learned position table, which RoPE has none of
    flops_per_token: int  # training FLOPs per token at block_size (6N + attention)
    kv_cache_per_token: int  # numbers a KV cache stores per generated token (2 x layers x kv heads x head_dim)
    val_loss: float  # nats per token after the last step
    seconds: float  # wall time of training and its evaluations
    val_history: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss)
    train_history: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss)


def compare_blocks(recipe: Recipe, *, names: list[str] | None = None, evals: int = 2,
                   progress: bool = False, **train_overrides: Any) -> list[BlockRun]:
    """Train every variant of :func:`variants` (or those in ``names``) for ``recipe.blocks.steps``
    steps of ``recipe.blocks.batch_size`` sequences of ``block_size`` tokens, at the recipe's
    model shape on its corpus; return one :class:`BlockRun` per variant, GPT-2 first.

    The tokenizer and shards are those of the recipe's pretraining run (made once,
    shared with chapter 4). The learning rate warms up over a tenth of the steps, then decays;
    validation runs ``evals`` times, evenly spaced, on the same batches for every variant.
    ``train_overrides`` (``learning_rate=...``) are :class:`~minigpt.train.TrainConfig` fields.
    """
    steps, batch_size, block_size = recipe.blocks.steps, recipe.blocks.batch_size, recipe.model.block_size
    if steps < 1 or batch_size < 1:
        raise ValueError(f"blocks.steps={steps} and blocks.batch_size={batch_size} must be at least 1")
    if not 1 <= evals <= steps:
        raise ValueError(f"evals={evals} must be between 1 and steps={steps}")
    table = variants(recipe.model.n_head)
    unknown = sorted(set(names or ()) - set(table))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(table)}")
    tok, prepared = prepare_data(recipe, find_or_make(recipe, "pretrain"))
    vocab_size = model_vocab_size(recipe, tok)
    cfg = TrainConfig.from_recipe(recipe, **{**dict(
        max_steps=steps, learning_rate=recipe.pretrain.learning_rate, warmup_steps=max(1, steps // 10),
        eval_interval=max(1, steps // evals), sample_interval=0, checkpoint_interval=0, log_interval=1),
        **train_overrides})
    runs = []
    for name in names or table:
        overrides = table[name]
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig.from_recipe(recipe, vocab_size=vocab_size, **overrides))
        c = model.config
        loaders = [ShardLoader(split, batch_size, block_size) for split in (prepared.train, prepared.val)]
        trainer = Trainer(model, cfg, *loaders, device=recipe.device)
        start = time.perf_counter()
        history = trainer.fit(progress=progress)
        seconds = time.perf_counter() - start
        val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
        runs.append(BlockRun(
            name=name, overrides=dict(overrides), params=model.num_params(),
            flops_per_token=model.flops_per_token(), kv_cache_per_token=2 * c.n_layer * c.kv_heads * c.head_dim,
            val_loss=val[-1][1], seconds=seconds, val_history=val,
            train_history=[(r["step"], r["loss"]) for r in history]))
    return runs


def format_table(runs: list[BlockRun]) -> str:
    """The runs as a fixed-width table, each loss also as a difference from the first run's."""
    base = runs[0]
    lines = [f"{'variant':<12} {'params':>9} {'MFLOP/tok':>9} {'KV/tok':>6} {'val loss':>8} "
             f"{'vs ' + base.name:>9} {'seconds':>7}"]
    for r in runs:
        lines.append(f"{r.name:<12} {r.params:>9,} {r.flops_per_token / 1e6:>9.2f} {r.kv_cache_per_token:>6} "
                     f"{r.val_loss:>8.3f} {r.val_loss - base.val_loss:>+9.3f} {r.seconds:>7.1f}")
    return "\n".join(lines)


def plot_runs(runs: list[BlockRun], ax: Any = None, window: int = 10) -> Any:
    """Training loss against step (a ``window``-step running mean: every variant sees the same
    batches, so the curves are comparable step by step), one line per variant, with its final
    validation loss in the legend; returns the matplotlib axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        steps, losses = (np.array(v) for v in zip(*r.train_history))
        w = min(window, len(losses))
        ax.plot(steps[w - 1:], np.convolve(losses, np.ones(w) / w, mode="valid"), label=f"{r.name} (val {r.val_loss:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({w}-step mean, nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
