"""Supervised fine-tuning (SFT): teach a pretrained GPT to answer in the chat format.

SFT is pretraining's loop on other batches. :class:`SFTSource` serves rendered conversations
(:func:`minigpt.chat.render`) as ``(inputs, targets)`` with ``-100`` wherever the model should
not learn, and :func:`sft` hands it to the same :class:`~minigpt.train.Trainer` that pretrains,
so checkpoints, resuming, logging and DDP come for free. With ``lora=...`` only low-rank adapters
train (:mod:`minigpt.lora`), plus a few token-embedding rows and the small modules
:func:`lora_settings` names.

**How the loss averages.** ``GPT.forward`` averages the loss over the learned (non ``-100``)
tokens of one micro-batch, and the Trainer averages those means over ``grad_accum``
micro-batches. So within a micro-batch every answer token counts the same (a long answer counts
more than a short one); across micro-batches each micro-batch counts the same, whatever its number
of answer tokens. The offline profiles use one micro-batch per step, where this is exactly the
mean over the step's answer tokens.

**The base model.** The profile's pretrained model (the default from ``cpu`` up), random
weights (``"fresh"``: the better start at ``ci``, where the pretrained model has had only 100
steps; see :data:`SFT_SETTINGS`), a pretrain run's folder, or a :class:`~minigpt.model.GPT` with
its tokenizer. The chat tokens are appended to the tokenizer, and the model's embedding grows to
match (:func:`resize_vocab`).

**The book's run.** :func:`finetuned` is the profile's full fine-tuning on arithmetic, kept in
the cache like the pretrained model: chapter 5 trains it (or finds it), and it keeps its checkpoint
at each of :attr:`SFTSettings.keep_steps`, one of which is where chapter 6's RL starts
(:func:`minigpt.rlhf.run.start_policy`). One run, not a second shorter one for RL.

**Digits.** The BPE pre-split (GPT-4's pattern) cuts numbers into groups of at most three digits,
and a tokenizer trained on Shakespeare has learned no merges of digits, so "85" is the two
tokens "8" "5": every number is spelled digit by digit, which is what makes carrying learnable.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from minigpt.chat import (
    CHAT_TOKENS,
    END_OF_TURN,
    Conversation,
    check_chat_tokenizer,
    render,
    with_chat_tokens,
)
from minigpt.checkpoint import checkpoint_config, checkpoint_state, load_checkpoint
from minigpt.data import cache_dir
from minigpt.lora import DEFAULT_TARGETS, apply_lora, save_lora, trainable_fraction
from minigpt.model import GPT, GPTConfig
from minigpt.pretrain import pretrain_tokenizer, pretrained, pretrained_dir
from minigpt.profiles import Profile
from minigpt.tasks import TASKS, answers, arithmetic, exact_match, make_task
from minigpt.tokenizer import BPETokenizer, get_encoding
from minigpt.train import TrainConfig, Trainer, init_distributed, kept_checkpoint_path

__all__ = [
    "SFT_SETTINGS",
    "SFTRun",
    "SFTSettings",
    "SFTSource",
    "TASK_CHOICES",
    "finetuned",
    "finetuned_dir",
    "finetuned_model",
    "load_base",
    "load_sft",
    "lora_settings",
    "lora_token_ids",
    "resize_vocab",
    "sft",
    "sft_config",
    "sft_settings",
    "task_data",
]

TooLong = Literal["error", "truncate", "drop"]


class SFTSource:
    """A :class:`~minigpt.train.BatchSource` over conversations: one conversation per row,
    right-padded to the longest in the batch (rounded up to ``pad_multiple``: 8 suits GPU
    matmuls, 1 wastes nothing on a CPU).

    Targets are the next token where the loss mask is on and ``-100`` elsewhere (padding
    included), so padding changes nothing but the amount of work. The order is a fresh
    permutation of all conversations per epoch, drawn from ``(seed, epoch)``; the position is
    two integers, so a resumed run continues with the very same batches. In a distributed run
    rank ``r`` takes the ``r``-th of ``world_size`` consecutive batches, as
    :class:`~minigpt.shards.ShardLoader` does; an epoch's last, incomplete step is skipped.

    Conversations longer than ``block_size + 1`` tokens raise ``ValueError`` (``too_long="error"``),
    are cut to that length (``"truncate"``, see :func:`~minigpt.chat.render`) or left out (``"drop"``).
    """

    def __init__(self, conversations: Sequence[Conversation], tokenizer: BPETokenizer, batch_size: int,
                 block_size: int, *, seed: int = 0, shuffle: bool = True, too_long: TooLong = "error",
                 rank: int = 0, world_size: int = 1, pad_multiple: int = 1) -> None:
        if too_long not in ("error", "truncate", "drop"):
            raise ValueError(f"too_long={too_long!r} must be 'error', 'truncate' or 'drop'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.shuffle, self.pad_multiple = seed, shuffle, pad_multiple
        self.rank, self.world_size = rank, world_size
        self.pad_id = check_chat_tokenizer(tokenizer)[END_OF_TURN]
        self.examples: list[tuple[list[int], list[bool]]] = []
        self.dropped = 0
        max_tokens = block_size + 1  # inputs are ids[:-1], targets ids[1:]
        for i, conv in enumerate(conversations):
            ids, mask = render(conv, tokenizer)
            if len(ids) > max_tokens:
                if too_long == "drop":
                    self.dropped += 1
                    continue
                if too_long == "error":
                    raise ValueError(f"conversation {i} renders to {len(ids)} tokens, more than block_size + 1 "
                                     f"= {max_tokens}; pass too_long='drop' to leave such conversations out "
                                     "or too_long='truncate' to cut them")
                ids, mask = ids[:max_tokens], mask[:max_tokens]
            if any(mask[1:]):  # a truncated conversation may have nothing left to learn
                self.examples.append((ids, mask))
            else:
                self.dropped += 1
        self.stride = batch_size * world_size  # conversations all ranks consume per step
        if len(self.examples) < self.stride:
            raise ValueError(f"{len(self.examples)} usable conversations are fewer than one step needs "
                             f"(batch_size x world_size = {self.stride}); give more data or a smaller batch")
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        return len(self.examples)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def collate(self, rows: Sequence[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rendered conversations -> right-padded (inputs, targets), targets -100 where not learned."""
        longest = max(len(ids) - 1 for ids, _ in rows)
        width = min(self.block_size, -(-longest // self.pad_multiple) * self.pad_multiple)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            x[r, :n] = torch.tensor(ids[:-1])
            y[r, :n] = torch.where(torch.tensor(mask[1:]), torch.tensor(ids[1:]), -100)
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.stride > len(self._order):  # the epoch is used up: a new order
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.position + self.rank * self.batch_size
        rows = [self.examples[i] for i in self._order[start:start + self.batch_size]]
        self.position += self.stride
        return self.collate(rows)

    def reset(self) -> None:
        """Back to the first batch of the first epoch."""
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "examples": len(self.examples), "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("seed", "examples", "world_size"):
            if state[key] != mine[key]:
                raise ValueError(f"the saved data position is for {key}={state[key]}, but this run has "
                                 f"{mine[key]}; resume with the same data, seed and number of processes")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


# ---------------------------------------------------------------------------------------------
# The base model
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def resize_vocab(model: GPT, vocab_size: int, *, seed: int = 0) -> GPT:
    """A copy of ``model`` whose token embedding (tied to the output head) has ``vocab_size`` rows.

    Old rows are kept, so logits of old tokens are unchanged. New rows are drawn around the mean
    of the old ones with their per-dimension spread (Hewitt 2021, "Initializing new word
    embeddings"): a new token starts as a plausible, average token -- not one the model
    predicts wildly -- and each gets its own vector, so the chat tokens can be told apart
    even where the embedding stays frozen (LoRA).
    """
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the model's {old}; shrinking would drop tokens")
    if vocab_size == old:
        return copy.deepcopy(model)
    weight = model.transformer.wte.weight
    bigger = GPT(dataclasses.replace(model.config, vocab_size=vocab_size)).to(device=weight.device, dtype=weight.dtype)
    state = {k: v for k, v in model.state_dict().items() if k not in ("transformer.wte.weight", "lm_head.weight")}
    bigger.load_state_dict(state, strict=False)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(vocab_size - old, weight.size(1), generator=generator).to(weight)
    new = bigger.transformer.wte.weight
    new[:old] = weight
    new[old:] = weight.mean(dim=0) + noise * weight.std(dim=0)
    return bigger


Base = str | os.PathLike | GPT | None


def load_base(base: Base, profile: Profile, *, tokenizer: BPETokenizer | None = None,
              seed: int = 0) -> tuple[GPT, BPETokenizer]:
    """The model to fine-tune and its tokenizer, with the chat tokens (see module docstring).

    ``base`` is one of
      * None: the start :data:`SFT_SETTINGS` names for ``profile`` ("pretrained" or "fresh");
      * ``"pretrained"``: the profile's cached pretrained model (:func:`minigpt.pretrain.pretrained`,
        trained on first use);
      * ``"fresh"``: random weights of the profile's size, with the profile's pretraining tokenizer;
      * a pretrain folder or checkpoint file (write ``./pretrained`` for a folder of that name);
      * a GPT (copied, never changed), with its ``tokenizer``.
    """
    if base is None:
        base = sft_settings(profile).base
    if isinstance(base, str) and base == "pretrained":
        base, own = pretrained(profile, progress=False)
        tokenizer = tokenizer or own
    if isinstance(base, str) and base == "fresh":
        tokenizer = tokenizer or pretrain_tokenizer(profile, pretrained_dir(profile))
        torch.manual_seed(seed)
        model = GPT(GPTConfig.from_profile(profile, vocab_size=tokenizer.vocab_size))
    elif isinstance(base, GPT):
        if tokenizer is None:
            raise ValueError("pass the tokenizer the base model was trained with: sft(..., tokenizer=...)")
        model = copy.deepcopy(base).train()
    else:
        path = Path(base)
        if not path.exists():
            raise FileNotFoundError(f"base model {path} does not exist; give 'pretrained', 'fresh', the folder "
                                    "of a `minigpt pretrain` run or a checkpoint file")
        folder, ckpt = (path, path / "checkpoint.safetensors") if path.is_dir() else (path.parent, path)
        if tokenizer is None:
            if (folder / "tokenizer.bpe").exists():
                tokenizer = BPETokenizer.load(folder / "tokenizer.bpe")
            elif profile.tokenizer == "gpt2":
                tokenizer = BPETokenizer.from_tiktoken(get_encoding("gpt2"))
            else:
                raise FileNotFoundError(f"no tokenizer.bpe next to {ckpt}; pass tokenizer=... or point "
                                        "base at the folder of a `minigpt pretrain` run")
        model, _ = load_checkpoint(ckpt)
    tokenizer = with_chat_tokens(tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        model = resize_vocab(model, tokenizer.vocab_size, seed=seed)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTSettings:
    """SFT's own knobs per profile (the model's size comes from the profile itself)."""

    base: str  # "pretrained" or "fresh": the better start at this size, as measured
    max_steps: int
    lora_max_steps: int  # LoRA learns more slowly per step: it gets more of them
    batch_size: int  # conversations per micro-batch
    learning_rate: float  # full fine-tuning
    lora_learning_rate: float  # adapters want a larger step than full weights
    lora_rank: int  # the smallest that keeps LoRA under 5% of the parameters at this width
    lora_token_rows: int  # embedding rows that train with LoRA: the chat tokens, then the answers' commonest
    lora_train_also: tuple[str, ...]  # small modules that train in full with LoRA (apply_lora's train_also)
    warmup_steps: int
    max_operand: int  # the default task: sums and differences of 0..max_operand
    n_test: int | None  # held-out problems for exact match (None: all of them)
    eval_interval: int
    keep_steps: tuple[int, ...]  # finetuned() keeps these checkpoints too: RL starts from one (rlhf.run)


# Measured on 2 CPU cores (figures in the SFT chapter):
# * ci (2 layers, width 64, 200 steps): one-digit sums and differences reach 0.82-1.0 held-out
#   exact match from a fresh model (4 seeds), but only 0.06-0.65 (by learning rate) from the
#   100-step Shakespeare model, a worse start than random weights at this size; two-digit operands
#   stay on a plateau (<= 0.15) for over 1,000 steps whatever the batch or learning rate.
# * cpu (4 layers, width 128): 0..99 reaches 0.944 on 500 held-out problems in 2,000 steps of 64
#   (4.3 minutes) from the pretrained model; the fresh model learns more slowly (0.65 against 0.75
#   in 1,000 steps of 128). More, smaller steps beat fewer, larger ones for the same tokens.
#   LoRA adapters alone (3% of the parameters, learning rate 1e-2; 3e-2 stalls) end at 0.07-0.11,
#   and rank 16 (10.9%) at 0.04; also training the embedding rows of the digits and chat tokens
#   reached 0.47 (0.67 in 4,000 steps): the frozen embeddings of tokens Shakespeare rarely uses are
#   the limit, not the rank. In 600-step runs the LayerNorms lowered the final loss from 1.12 to
#   1.05, and the position embedding as well to 0.83; that setting (rows, LayerNorms, wpe: 4.8%)
#   reached 0.422 in 2,000 steps. All of these decayed the adapters (weight decay 0.1); without
#   it (minigpt.lora's rule now) the same setting reached 0.700 in 2,000 steps (val loss 0.25 and
#   falling fast) and 0.930 in 3,000, within 1.4 points of full SFT with 4.8% of the parameters.
#   (Those were `minigpt sft` runs, mostly on 1 thread. The book's 2-thread build of the chapter
#   measured full SFT 0.912 in 3.2 minutes and LoRA 0.872 in 5.2, and, once the loss ran the
#   output head at the answer tokens only (the same loss, summed in another order), 0.870 and
#   0.826: the last points move with the thread count and the rounding.) In 2,000 steps LoRA reached
#   0.740 (1 thread; 0.074 at learning rate 2e-2, which stalls). From the 1,000-step base model:
#   0.676 in 2,000 steps (full SFT 0.926), 0.532 in 3,000 steps of 48, and LoRA+ (B's learning rate
#   4x or 8x A's, Hayou et al. 2024) stalled at 0.004 and 0.034. The book's cpu LoRA runs 2,500
#   steps, so that `make book` fits in 25 minutes: 0.788 against full SFT's 0.962 in that build
#   (3,000 steps gave 0.750 in the build before; the last points of this run are chaotic).
# * ci trains from random weights, where LoRA has little to adapt: 0.41 in 200 steps, 0.71 in 400.
# Fine-tuning uses a learning rate like pretraining's: the task is new to the model, so there is
# little pretrained knowledge to protect.
#: SFT's settings for each profile, with the measurements behind them in the comment above.
SFT_SETTINGS: dict[str, SFTSettings] = {
    "ci": SFTSettings(base="fresh", max_steps=200, lora_max_steps=400, batch_size=128, learning_rate=5e-3,
                      lora_learning_rate=1e-2, warmup_steps=20, max_operand=9, n_test=None, eval_interval=100,
                      keep_steps=(120,),
                      lora_rank=2, lora_token_rows=16,
                      lora_train_also=("ln_1", "ln_2", "ln_f")),
    "cpu": SFTSettings(base="pretrained", max_steps=2000, lora_max_steps=2500, batch_size=64, learning_rate=3e-3,
                       lora_learning_rate=1e-2, warmup_steps=50, max_operand=99, n_test=500, eval_interval=500,
                       keep_steps=(1200,),
                       lora_rank=4, lora_token_rows=16,
                       lora_train_also=("ln_1", "ln_2", "ln_f", "wpe")),
    "gpu": SFTSettings(base="pretrained", max_steps=2000, lora_max_steps=3000, batch_size=128, learning_rate=1e-3,
                       lora_learning_rate=5e-3, warmup_steps=100, max_operand=99, n_test=1000, eval_interval=250,
                       keep_steps=(1200,), lora_rank=16, lora_token_rows=32,
                       lora_train_also=("ln_1", "ln_2", "ln_f", "wpe")),
    "full": SFTSettings(base="pretrained", max_steps=2000, lora_max_steps=3000, batch_size=128, learning_rate=3e-4,
                        lora_learning_rate=3e-3, warmup_steps=100, max_operand=99, n_test=1000, eval_interval=250,
                        keep_steps=(1200,), lora_rank=16, lora_token_rows=32,
                        lora_train_also=("ln_1", "ln_2", "ln_f", "wpe")),
}


def lora_settings(profile: Profile) -> dict[str, Any]:
    """:func:`~minigpt.lora.apply_lora`'s arguments for ``profile``: every linear layer of every
    block (at ``cpu``, rank 4 on all of them beat rank 8 on c_attn and c_fc alone for fewer
    parameters, 1.45 against 1.95 loss at step 500) at the profile's rank, alpha = 2 r; the
    LayerNorms (and, where it fits in 5% of the parameters, the position embedding) train in full.

    ``token_rows`` is a number here, the most rows to train: :func:`sft` turns it into token ids
    with :func:`lora_token_ids` once it has the tokenizer and the data.
    """
    s = sft_settings(profile)
    return {"targets": DEFAULT_TARGETS, "r": s.lora_rank, "alpha": 2.0 * s.lora_rank, "dropout": 0.0,
            "token_rows": s.lora_token_rows, "train_also": s.lora_train_also}


def lora_token_ids(tokenizer: BPETokenizer, examples: Sequence[tuple[Sequence[int], Sequence[bool]]],
                   limit: int) -> list[int]:
    """The token ids whose embedding rows train with LoRA: the chat tokens (new, so their rows are
    random), then the tokens the model learns to predict most often in ``examples`` (rendered
    conversations, ``(ids, loss_mask)`` as :func:`~minigpt.chat.render` gives them), at most
    ``limit`` in all. For arithmetic these are the ten digits, which Shakespeare barely used."""
    chat = [tokenizer.special_tokens[t] for t in CHAT_TOKENS]
    counts = Counter(i for ids, mask in examples for i, learn in zip(ids, mask) if learn)
    common = sorted((i for i in counts if i not in chat), key=lambda i: (-counts[i], i))
    return (chat + common)[:max(0, limit)]


def sft_settings(profile: Profile) -> SFTSettings:
    if profile.name not in SFT_SETTINGS:
        raise ValueError(f"no SFT settings for profile {profile.name!r}; add them to minigpt.sft.SFT_SETTINGS")
    return SFT_SETTINGS[profile.name]


TASK_CHOICES = tuple(TASKS)
TRAIN_EXAMPLES = 20_000  # for a generated task or the mixture (arithmetic enumerates every problem)


def task_data(profile: Profile, task: str, split: str, *, seed: int = 0) -> list[Conversation]:
    """The default data of :func:`sft`: every arithmetic problem of the split up to the profile's
    ``max_operand`` (``n_test`` of them held out), or generated examples of another offline task."""
    s = sft_settings(profile)
    if task == "arithmetic":
        return arithmetic(None if split == "train" else s.n_test, split=split, seed=seed, max_operand=s.max_operand)
    return make_task(task, TRAIN_EXAMPLES if split == "train" else s.n_test or 200, split=split, seed=seed)


def sft_config(profile: Profile, *, lora: bool = False, **overrides: Any) -> TrainConfig:
    """The Trainer's settings for SFT at ``profile``; ``overrides`` win."""
    s = sft_settings(profile)
    base = dict(max_steps=s.lora_max_steps if lora else s.max_steps, grad_accum=1, warmup_steps=s.warmup_steps,
                learning_rate=s.lora_learning_rate if lora else s.learning_rate,
                eval_interval=s.eval_interval, eval_steps=4, log_interval=10,
                checkpoint_interval=s.eval_interval, sample_interval=s.eval_interval,
                dtype=profile.dtype, compile=profile.compile)
    base["head_at_targets_only"] = not overrides.get("compile", base["compile"])  # answer tokens only
    return TrainConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class SFTRun:
    """What :func:`sft` returns: the trainer (model, history), the chat tokenizer, the data and
    the held-out exact match at the end (NaN on the other ranks of a DDP run: measured once)."""

    trainer: Trainer
    tokenizer: BPETokenizer
    train: list[Conversation]
    test: list[Conversation]
    exact_match: float

    @property
    def model(self) -> GPT:
        return self.trainer.raw_model

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.trainer.history


def sft(profile: Profile, base: Base, out_dir: str | os.PathLike, *,
        tokenizer: BPETokenizer | None = None, task: str = "arithmetic",
        train: Sequence[Conversation] | None = None, test: Sequence[Conversation] | None = None,
        lora: bool | Mapping[str, Any] | None = None,
        too_long: TooLong = "error", resume: bool = True, progress: bool = True,
        batch_size: int | None = None, stop_at: int | None = None, keep_steps: Sequence[int] = (),
        **train_overrides: Any) -> SFTRun:
    """Fine-tune ``base`` (see :func:`load_base`) on ``train`` and measure exact match on ``test``.

    The data default to ``task``'s train and held-out splits (:func:`task_data`). ``lora=True``
    trains only LoRA adapters, token rows and small modules with :func:`lora_settings`; a dict
    overrides them (``targets``, ``r``, ``alpha``, ``dropout``, ``train_also``, and ``token_rows``:
    a number of rows for :func:`lora_token_ids` to choose from the training data, or the token ids
    themselves). ``sft.json`` records the ids, so :func:`load_sft` rebuilds the same model. Checkpoints, metrics,
    ``tokenizer.bpe``, ``sft.json`` and, with LoRA, ``lora.safetensors`` go to ``out_dir``; a run
    with a checkpoint there continues from it (``resume=False`` starts over). ``train_overrides``
    are :class:`~minigpt.train.TrainConfig` fields; ``batch_size`` (conversations per micro-batch)
    overrides the profile's :data:`SFT_SETTINGS`. ``stop_at`` and ``keep_steps`` go to
    :meth:`~minigpt.train.Trainer.fit`: stop early at that step of the schedule (a later call
    continues onto the same curve), keep the checkpoints of those steps.
    """
    ddp, device = init_distributed(profile.device)
    settings = sft_settings(profile)
    if batch_size is not None:
        settings = dataclasses.replace(settings, batch_size=batch_size)
    out = Path(out_dir)
    cfg = sft_config(profile, lora=bool(lora), **train_overrides)
    model, tok = load_base(base, profile, tokenizer=tokenizer, seed=cfg.seed)
    generated = train is None
    train = list(train) if train is not None else task_data(profile, task, "train", seed=cfg.seed)
    test = list(test) if test is not None else task_data(profile, task, "test", seed=cfg.seed)
    block = model.config.block_size
    pad = 8 if device.startswith("cuda") else 1
    source = SFTSource(train, tok, settings.batch_size, block, seed=cfg.seed, too_long=too_long,
                       rank=ddp.rank, world_size=ddp.world_size, pad_multiple=pad)
    lora_kwargs = None
    if lora:
        lora_kwargs = {**lora_settings(profile), **(lora if isinstance(lora, Mapping) else {})}
        rows = lora_kwargs.get("token_rows", ())
        rows = lora_token_ids(tok, source.examples, rows) if isinstance(rows, int) else rows
        # As lists, so that sft.json (JSON) holds exactly what apply_lora was given.
        lora_kwargs.update(token_rows=[int(i) for i in rows],
                           targets=_names(lora_kwargs.get("targets", DEFAULT_TARGETS)),
                           train_also=_names(lora_kwargs.get("train_also", ())))
        torch.manual_seed(cfg.seed)  # the adapters' A matrices are random
        apply_lora(model, **lora_kwargs)
    val = SFTSource(test, tok, min(settings.batch_size, len(test)), block, shuffle=False, too_long="drop")
    if "eval_steps" not in train_overrides:  # no more validation batches than the held-out set fills
        cfg = dataclasses.replace(cfg, eval_steps=max(1, min(cfg.eval_steps, len(val) // val.batch_size)))

    def sample(m: GPT) -> str:
        q = test[0]
        return f"{q.prompt[-1].content} -> {answers(m, tok, [q])[0]!r} (expected {q.answer!r})"

    if ddp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # Trainer appends to metrics.jsonl; a fresh start must not inherit old lines
            (out / "metrics.jsonl").unlink(missing_ok=True)
        tok.save(out / "tokenizer.bpe")
        (out / "sft.json").write_text(json.dumps({"profile": profile.name, "task": task if generated else "custom",
                                                  "lora": lora_kwargs}, indent=1))
    trainer = Trainer(model, cfg, source, val, device=device, out_dir=out, ddp=ddp, sample=sample)
    if resume and trainer.resume() and ddp.is_main:
        print(f"resumed from {trainer.checkpoint_path} at step {trainer.step}")
    if ddp.is_main:
        what = "full fine-tuning"
        if lora_kwargs:
            shown = {**lora_kwargs, "token_rows": f"{len(lora_kwargs['token_rows'])} ids"}
            what = f"LoRA {shown}, {trainable_fraction(model):.2%} of parameters trainable"
        print(f"SFT: {len(source)} conversations ({source.dropped} dropped), {len(test)} held out; {what}; "
              f"{cfg.max_steps} steps of {settings.batch_size} conversations on {device}")
    trainer.fit(progress=progress, stop_at=stop_at, keep_steps=keep_steps)
    # Measured once, on the main process (every rank holds the same weights after DDP).
    score = exact_match(trainer.raw_model, tok, test) if ddp.is_main else float("nan")
    if ddp.is_main:
        if lora_kwargs:
            save_lora(trainer.raw_model, out / "lora.safetensors")
        print(f"held-out exact match: {score:.3f} on {len(test)} conversations")
    return SFTRun(trainer, tok, train, test, score)


def _names(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def finetuned_dir(profile: Profile) -> Path:
    """Where :func:`finetuned` keeps its run: a folder in the cache named by a hash of what shapes
    that model (the pretrained model's folder, which hashes every pretraining setting, and the
    full fine-tuning settings; LoRA's do not)."""
    full_sft = {k: v for k, v in dataclasses.asdict(sft_settings(profile)).items() if not k.startswith("lora_")}
    key = json.dumps([pretrained_dir(profile).name, full_sft], sort_keys=True)
    return cache_dir() / "sft" / f"{profile.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def finetuned(profile: Profile, *, stop_at: int | None = None) -> SFTRun:
    """The profile's full fine-tuning on arithmetic (:func:`sft` with its defaults), trained on
    first use into :func:`finetuned_dir`, resumed if interrupted, later only loaded and measured.

    The checkpoints at :attr:`SFTSettings.keep_steps` stay beside the last (load one with
    ``load_sft(finetuned_dir(profile), step=...)``). ``stop_at`` trains only that far, for a
    caller that needs only an early checkpoint; a later call continues onto the same curve.
    """
    return sft(profile, None, finetuned_dir(profile), progress=False, stop_at=stop_at,
               keep_steps=sft_settings(profile).keep_steps)


def finetuned_model(profile: Profile, *, step: int | None = None) -> tuple[GPT, BPETokenizer]:
    """The model (in eval mode) and chat tokenizer of :func:`finetuned`'s run, at its end or at a
    kept ``step``: trained on first use (only as far as ``step``), later only loaded, without the
    exact-match measurement :func:`finetuned` makes."""
    out = finetuned_dir(profile)
    if step is not None:
        ready = kept_checkpoint_path(out, step).exists()
    else:  # the last checkpoint may be that of a run stopped early (stop_at) or killed
        last = out / "checkpoint.safetensors"
        ready = last.exists() and checkpoint_state(last)["step"] >= sft_settings(profile).max_steps
    if not ready:
        finetuned(profile, stop_at=step)
    model, tok = load_sft(out, step=step)
    return model.to(profile.device).eval(), tok


def load_sft(out_dir: str | os.PathLike, *, step: int | None = None) -> tuple[GPT, BPETokenizer]:
    """The fine-tuned model and chat tokenizer of an :func:`sft` run (adapters in place, unmerged):
    its last checkpoint, or the one kept at ``step`` (``keep_steps``)."""
    out = Path(out_dir)
    meta_path = out / "sft.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} does not exist: {out} is not the folder of a fine-tuning run; "
                                "make one with `minigpt sft --out FOLDER` (or minigpt.sft.sft)")
    meta = json.loads(meta_path.read_text())
    tok = BPETokenizer.load(out / "tokenizer.bpe")
    path = out / "checkpoint.safetensors" if step is None else kept_checkpoint_path(out, step)
    if step is not None and not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the run in {out} kept no checkpoint of step {step} "
                                "(sft(..., keep_steps=[...]) keeps them)")
    model = GPT(checkpoint_config(path))
    if meta["lora"]:  # lists in JSON; token_rows and train_also absent in runs older than them
        kwargs = meta["lora"]
        apply_lora(model, **{**kwargs, "targets": tuple(kwargs["targets"]),
                             "train_also": tuple(kwargs.get("train_also", ()))})
    load_checkpoint(path, model)
    return model, tok
