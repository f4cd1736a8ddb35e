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
of answer tokens. The offline recipes use one micro-batch per step, where this is exactly the
mean over the step's answer tokens.

**The base model.** The recipe's pretraining run (the default from ``cpu`` up), random
weights (``"fresh"``: the better start at ``ci``, where the pretrained model has had only 100
steps; see ``recipe.sft.base``), the folder of a run, or a :class:`~minigpt.model.GPT` with
its tokenizer. The chat tokens are appended to the tokenizer, and the model's embedding grows to
match (:func:`resize_vocab`).

**The book's run.** ``find_or_make(recipe, "sft")`` (:mod:`minigpt.runs`) is the recipe's full
fine-tuning on arithmetic, cached like the pretrained model: chapter 5 trains it (or finds it), and
it keeps its checkpoint at each of ``recipe.sft.keep_steps``, one of which is where chapter 6's RL
starts (:func:`minigpt.rlhf.run.start_policy`). One run, not a second shorter one for RL.

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
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
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
from minigpt.lora import DEFAULT_TARGETS, apply_lora, save_lora, trainable_fraction
from minigpt.model import GPT, GPTConfig
from minigpt.peft import apply_peft
from minigpt.recipe import Recipe, override
from minigpt.runs import begin_run, find_or_make, finish_run, load_run, read_run, run_info, run_lock
from minigpt.tasks import TASKS, answers, arithmetic, exact_match, make_task
from minigpt.tokenizer import BPETokenizer
from minigpt.train import TrainConfig, Trainer, init_distributed

__all__ = [
    "SFTRun",
    "SFTSource",
    "TASK_CHOICES",
    "load_base",
    "lora_settings",
    "lora_token_ids",
    "resize_vocab",
    "sft",
    "sft_config",
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

    ``group_by_length`` batches conversations of similar length together (as Hugging Face's
    ``group_by_length``): each epoch's order is cut into runs of 50 batches, each run sorted by
    length in buckets of 32 tokens and cut into batches, and the batches shuffled. A mixture of short
    and long conversations then pads each batch to its own kind, not to the longest of the mixture.
    Buckets, not exact lengths: within a bucket the order stays random, so a batch of short
    conversations still mixes every kind of them, as plain shuffling would.
    """

    def __init__(self, conversations: Sequence[Conversation], tokenizer: BPETokenizer, batch_size: int,
                 block_size: int, *, seed: int = 0, shuffle: bool = True, too_long: TooLong = "error",
                 rank: int = 0, world_size: int = 1, pad_multiple: int = 1, group_by_length: bool = False) -> None:
        if too_long not in ("error", "truncate", "drop"):
            raise ValueError(f"too_long={too_long!r} must be 'error', 'truncate' or 'drop'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.shuffle, self.pad_multiple = seed, shuffle, pad_multiple
        self.group_by_length = group_by_length
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
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n)
        if not self.group_by_length:
            return order
        # The last, short batch (next_batch skips it) is set aside before sorting: a random few, as
        # without grouping, not the longest conversations of every epoch.
        full = n // self.batch_size * self.batch_size
        order, left = order[:full], order[full:]
        run = self.batch_size * 50
        widths = np.array([(len(ids) - 1) // 32 for ids, _ in self.examples])  # 32-token buckets, see above
        order = np.concatenate([chunk[np.argsort(widths[chunk], kind="stable")]
                                for chunk in np.split(order, range(run, full, run))])
        batches = np.split(order, full // self.batch_size)
        return np.concatenate([*(batches[i] for i in rng.permutation(len(batches))), left])

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


def load_base(base: Base, recipe: Recipe, *, tokenizer: BPETokenizer | None = None,
              seed: int = 0) -> tuple[GPT, BPETokenizer, str | None]:
    """The model to fine-tune, its tokenizer with the chat tokens (see module docstring), and the
    key of the run it comes from (:attr:`minigpt.runs.RunInfo.key`; None for a model passed in).

    ``base`` is one of
      * None: the start ``recipe.sft.base`` names ("pretrained" or "fresh");
      * ``"pretrained"``: the recipe's pretraining run (:func:`minigpt.runs.find_or_make`: trained
        on first use, then cached);
      * ``"fresh"``: random weights of the recipe's shape, with that run's tokenizer;
      * the folder of a run (``minigpt pretrain --out`` or ``minigpt sft --out``; write
        ``./pretrained`` for a folder of that name);
      * a GPT (copied, never changed), with its ``tokenizer``.
    """
    parent = None
    if base is None:
        base = recipe.sft.base
    if isinstance(base, str) and base in ("pretrained", "fresh"):
        folder = find_or_make(recipe, "pretrain")
        if base == "fresh":
            tokenizer = tokenizer or BPETokenizer.load(folder / "tokenizer.bpe")
            torch.manual_seed(seed)
            model = GPT(GPTConfig.from_recipe(recipe, vocab_size=tokenizer.vocab_size))
            parent = read_run(folder).key
        else:
            base = folder
    if isinstance(base, GPT):
        if tokenizer is None:
            raise ValueError("pass the tokenizer the base model was trained with: sft(..., tokenizer=...)")
        model = copy.deepcopy(base).train()
    elif base != "fresh":
        folder = Path(base)
        if not folder.is_dir():
            raise FileNotFoundError(f"base model {folder} is not a folder; give 'pretrained', 'fresh' or the folder "
                                    "of a `minigpt pretrain` or `minigpt sft` run")
        model, own = load_run(folder, device="cpu")
        model.train()
        tokenizer, parent = tokenizer or own, read_run(folder).key
    tokenizer = with_chat_tokens(tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        model = resize_vocab(model, tokenizer.vocab_size, seed=seed)
    return model, tokenizer, parent


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def lora_settings(recipe: Recipe) -> dict[str, Any]:
    """:func:`~minigpt.lora.apply_lora`'s arguments from ``recipe.lora``: every linear layer of
    every block at the recipe's rank and alpha, no dropout, and the small modules it names
    training in full (see "How the recipes were chosen" in the book for the measurements).

    ``token_rows`` is a number here, the most rows to train: :func:`sft` turns it into token ids
    with :func:`lora_token_ids` once it has the tokenizer and the data.
    """
    lo = recipe.lora
    return {"targets": DEFAULT_TARGETS, "r": lo.rank, "alpha": lo.alpha, "dropout": 0.0,
            "token_rows": lo.token_rows, "train_also": lo.train_also}


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


TASK_CHOICES = tuple(TASKS)


def task_data(recipe: Recipe, task: str, split: str, *, seed: int = 0) -> list[Conversation]:
    """The default data of :func:`sft`: every arithmetic problem of the split up to the recipe's
    ``sft.max_operand`` (``sft.n_test`` of them held out), or generated examples of another offline task."""
    s = recipe.sft
    if task == "arithmetic":
        return arithmetic(None if split == "train" else s.n_test, split=split, seed=seed, max_operand=s.max_operand)
    return make_task(task, s.train_examples if split == "train" else s.n_test or 200, split=split, seed=seed)


#: Also the name of the recipe part that sets the run: recipe.sft, recipe.chat, recipe.instruct.
Stage = Literal["sft", "chat", "instruct"]


def sft_config(recipe: Recipe, *, lora: bool = False, stage: Stage = "sft", **overrides: Any) -> TrainConfig:
    """The Trainer's settings for SFT (``recipe.sft``, ``recipe.lora`` with ``lora``, or the part of
    the chat models' ``stage``, ``recipe.chat`` or ``recipe.instruct``); ``overrides`` win."""
    s = getattr(recipe, stage)
    base: dict[str, Any] = dict(
        max_steps=recipe.lora.steps if lora else s.steps, grad_accum=1, warmup_steps=s.warmup_steps,
        learning_rate=recipe.lora.learning_rate if lora else s.learning_rate,
        eval_interval=s.eval_interval, eval_steps=4, log_interval=10,
        checkpoint_interval=s.eval_interval, sample_interval=s.eval_interval)
    base["head_at_targets_only"] = not overrides.get("compile", recipe.compile)  # answer tokens only
    return TrainConfig.from_recipe(recipe, **{**base, **overrides})


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


def sft(recipe: Recipe, base: Base, out_dir: str | os.PathLike, *,
        tokenizer: BPETokenizer | None = None, task: str = "arithmetic",
        train: Sequence[Conversation] | None = None, test: Sequence[Conversation] | None = None,
        lora: bool | Mapping[str, Any] | None = None, peft: Mapping[str, Any] | None = None, stage: Stage = "sft",
        too_long: TooLong = "error", resume: bool = True, progress: bool = True,
        batch_size: int | None = None, stop_at: int | None = None, keep_steps: Sequence[int] = (),
        penalty: Callable[[torch.nn.Module], torch.Tensor] | None = None, **train_overrides: Any) -> SFTRun:
    """Fine-tune ``base`` (see :func:`load_base`) on ``train`` and measure exact match on ``test``.

    The data default to ``task``'s train and held-out splits (:func:`task_data`). ``lora=True``
    trains only LoRA adapters, token rows and small modules with :func:`lora_settings`; a dict
    overrides them (``targets``, ``r``, ``alpha``, ``dropout``, ``train_also``, and ``token_rows``:
    a number of rows for :func:`lora_token_ids` to choose from the training data, or the token ids
    themselves). ``peft={"method": "adapter", "bottleneck": 16}`` trains instead one of the methods
    of :func:`minigpt.peft.apply_peft` (``"adapter"``, ``"ia3"``, ``"prefix"``). ``run.json`` records
    either, so :func:`~minigpt.runs.load_run` rebuilds the same model. Checkpoints, metrics,
    ``tokenizer.bpe``, ``run.json`` and, with LoRA, ``lora.safetensors`` go to ``out_dir``; a run with a checkpoint there continues from it, a folder of a run made
    otherwise is refused, and ``resume=False`` starts over (:func:`~minigpt.runs.begin_run`); a folder
    another run trains into is refused (:func:`~minigpt.runs.run_lock`). ``train_overrides``
    are :class:`~minigpt.train.TrainConfig` fields; ``batch_size`` (conversations per micro-batch)
    overrides the stage's ``batch_size`` in the recipe. ``stop_at`` and ``keep_steps`` go to
    :meth:`~minigpt.train.Trainer.fit`: stop early at that step of the schedule (a later call
    continues onto the same curve), keep the checkpoints of those steps. ``penalty`` goes to the
    :class:`~minigpt.train.Trainer`: a term of the weights added to every step's loss (EWC in
    :mod:`minigpt.continual`); ``run.json`` does not record it.

    ``stage="chat"`` trains the chat model (:func:`minigpt.chatbot.train_chat` gives it its data),
    ``stage="instruct"`` GPT-2 on an instruction set (:func:`minigpt.chatbot.train_instruct`): the
    recipe part of that name sets the steps, batch and learning rate, batches group conversations
    of similar length, ``run.json`` records the stage, and no exact match is measured (dialogue has
    no one right answer).
    """
    if stage not in ("sft", "chat", "instruct"):
        raise ValueError(f"stage={stage!r} must be 'sft', 'chat' or 'instruct'")
    if stage != "sft" and (lora or peft):
        raise ValueError(f"the {stage} model trains in full; LoRA and the other PEFT methods are for the sft stage")
    if lora and peft:
        raise ValueError("give lora or peft, not both: one method of fine-tuning per run")
    if isinstance(base, (str, os.PathLike)) and Path(base).resolve() == Path(out_dir).resolve():
        raise ValueError(f"--base and --out are both {base}: fine-tuning into the folder of the run it starts from "
                         "would replace that run; choose another output folder")
    ddp, device = init_distributed(recipe.device)
    if batch_size is not None:
        recipe = override(recipe, {f"{stage}.batch_size": batch_size})
    batch_size = getattr(recipe, stage).batch_size
    out = Path(out_dir)
    cfg = sft_config(recipe, lora=bool(lora), stage=stage, **train_overrides)
    model, tok, parent = load_base(base, recipe, tokenizer=tokenizer, seed=cfg.seed)
    generated, test_generated = train is None, test is None
    train = list(train) if train is not None else task_data(recipe, task, "train", seed=cfg.seed)
    test = list(test) if test is not None else task_data(recipe, task, "test", seed=cfg.seed)
    block = model.config.block_size
    given = test  # what run.json's digest describes
    if too_long != "error":  # a held-out conversation that does not fit is left out of every measure
        test = [c for c in test if len(render(c, tok)[0]) <= block + 1]
    pad = 8 if device.startswith("cuda") else 1
    source = SFTSource(train, tok, batch_size, block, seed=cfg.seed, too_long=too_long,
                       rank=ddp.rank, world_size=ddp.world_size, pad_multiple=pad, group_by_length=stage != "sft")
    lora_kwargs = None
    if lora:
        lora_kwargs = {**lora_settings(recipe), **(lora if isinstance(lora, Mapping) else {})}
        rows = lora_kwargs.get("token_rows", ())
        rows = lora_token_ids(tok, source.examples, rows) if isinstance(rows, int) else rows
        # As lists, so that run.json (JSON) holds exactly what apply_lora was given.
        lora_kwargs.update(token_rows=[int(i) for i in rows],
                           targets=_names(lora_kwargs.get("targets", DEFAULT_TARGETS)),
                           train_also=_names(lora_kwargs.get("train_also", ())))
        torch.manual_seed(cfg.seed)  # the adapters' A matrices are random
        apply_lora(model, **lora_kwargs)
    if peft:
        peft = dict(peft)
        torch.manual_seed(cfg.seed)  # adapters and prefixes start random
        apply_peft(model, **peft)
    # The held-out conversations that fit, shared out among the processes (Trainer.evaluate has each
    # read eval_steps / processes batches), in batches no larger than each one's share.
    usable = len(SFTSource(test, tok, 1, block, shuffle=False, too_long="drop"))
    if usable < ddp.world_size:
        raise ValueError(f"{usable} held-out conversations fit the model's context; {ddp.world_size} processes need "
                         "at least one each: give more held-out data")
    val = SFTSource(test, tok, min(batch_size, usable // ddp.world_size), block, shuffle=False, too_long="drop",
                    rank=ddp.rank, world_size=ddp.world_size)
    if "eval_steps" not in train_overrides:  # no more validation batches than the held-out set fills
        fills = usable // val.stride * ddp.world_size
        cfg = dataclasses.replace(cfg, eval_steps=max(1, min(cfg.eval_steps, fills)))

    def sample(m: GPT) -> str:
        q = test[0]
        return f"{q.prompt[-1].content} -> {answers(m, tok, [q])[0]!r} (expected {q.answer!r})"

    # GPT-2's weights and a model passed in (chapter 14's byte-level ones) bring their own shape and
    # tokenizer: run.json records those, not the recipe's tokenizer and model parts, and the class
    # of a model that is not a plain GPT (chapter 14's CoupledGPT), for load_run to rebuild.
    own_shape = stage == "instruct" or isinstance(base, GPT)
    shape = {"model": dataclasses.asdict(model.config),
             "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size}} if own_shape else {}
    if type(model) is not GPT:
        shape["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    info = run_info(recipe, "lora" if lora_kwargs else stage, parent=parent,
                    parts=(*(() if own_shape else ("tokenizer", "model")), "optim", stage, *(("lora",) if lora else ())),
                    module="minigpt.sft" if stage == "sft" else "minigpt.chatbot", train=train_overrides,
                    extra={"task": task if generated else "custom", "lora": lora_kwargs, "peft": peft, **shape,
                           "data": {"train": task if generated else _digest(train),  # begin_run compares it
                                    "test": task if test_generated else _digest(given)}})
    with run_lock(out) if ddp.is_main else nullcontext():  # the folder is this run's until it ends
        if ddp.is_main:
            begin_run(out, info, resume=resume)
            tok.save(out / "tokenizer.bpe")
        trainer = Trainer(model, cfg, source, val, device=device, out_dir=out, ddp=ddp, sample=sample,
                          penalty=penalty)
        if resume and trainer.resume() and ddp.is_main:
            print(f"resumed from {trainer.checkpoint_path} at step {trainer.step}")
        if ddp.is_main:
            what = "full fine-tuning"
            if lora_kwargs:
                shown = {**lora_kwargs, "token_rows": f"{len(lora_kwargs['token_rows'])} ids"}
                what = f"LoRA {shown}, {trainable_fraction(model):.2%} of parameters trainable"
            if peft:
                what = f"{peft['method']} {peft}, {trainable_fraction(model):.2%} of parameters trainable"
            print(f"SFT: {len(source)} conversations ({source.dropped} dropped), {len(test)} held out; {what}; "
                  f"{cfg.max_steps} steps of {batch_size} conversations on {device}")
        trainer.fit(progress=progress, stop_at=stop_at, keep_steps=keep_steps)
        # Measured once, on the main process (every rank holds the same weights after DDP).
        checkable = ddp.is_main and stage == "sft"
        score = exact_match(trainer.raw_model, tok, test) if checkable else float("nan")
        if ddp.is_main:
            if lora_kwargs:
                save_lora(trainer.raw_model, out / "lora.safetensors")
            if trainer.step >= cfg.max_steps:  # not a run stopped early (stop_at)
                finish_run(out, info, **({"exact_match": score} if checkable else {}))
            if checkable:
                print(f"held-out exact match: {score:.3f} on {len(test)} conversations")
    return SFTRun(trainer, tok, train, test, score)


def _digest(conversations: Sequence[Conversation]) -> str:
    """A short digest of conversations given as data, so that a run folder is not continued on other data."""
    text = json.dumps([[(m.role, m.content) for m in c.messages] for c in conversations])
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _names(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)
