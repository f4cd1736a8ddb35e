"""Pretraining end to end, the same code on a laptop and under ``torchrun`` on GPUs:
corpus -> tokenizer -> token shards -> GPT -> :class:`~minigpt.train.Trainer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import tiktoken
import torch

from minigpt.data import CORPORA, PreparedCorpus, corpus_prepared, prepare_corpus
from minigpt.errors import MinigptError
from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig
from minigpt.recipe import Recipe
from minigpt.runs import begin_run, finish_run, run_info, run_lock
from minigpt.shards import ShardLoader
from minigpt.tokenizer import BPETokenizer, gpt2_tokenizer, train_bpe
from minigpt.train import Distributed, TrainConfig, Trainer, init_distributed

EOT = "<|endoftext|>"
#: What a run folder's tokenizer and shards were prepared from (:func:`prepared_as`).
PREPARED = "prepared.json"


def pretrain_tokenizer(recipe: Recipe, out_dir: str | os.PathLike) -> BPETokenizer:
    """GPT-2's encoding, or a BPE trained on the corpus's training text; saved to ``out_dir``
    (every run folder holds its tokenizer), then reused."""
    t = recipe.tokenizer
    path = Path(out_dir) / "tokenizer.bpe"
    if path.exists():
        held = _preparation(Path(out_dir))
        if held is not None and held != _wanted(recipe):  # a folder prepared before the record has none
            changed = "; ".join(f"{k}: {held.get(k)!r} -> {v!r}" for k, v in _wanted(recipe).items() if held.get(k) != v)
            raise ValueError(f"{out_dir} holds a tokenizer and token shards prepared otherwise ({changed}): choose "
                             "another output folder, or delete those files")
        return BPETokenizer.load(path)
    if t.kind == "gpt2":
        tok = gpt2_tokenizer()
    else:
        train_docs, _ = CORPORA[recipe.pretrain.corpus].splits()
        text, size = [], 0
        for doc in train_docs:  # the first corpus_chars characters of the training split
            text.append(doc[:t.corpus_chars - size])
            size += len(text[-1])
            if size >= t.corpus_chars:
                break
        tok = train_bpe("".join(text), t.vocab_size, special_tokens=[EOT])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    (path.parent / PREPARED).write_text(json.dumps(_wanted(recipe), indent=1))
    return tok


def _wanted(recipe: Recipe) -> dict[str, object]:
    """The settings a prepared corpus depends on: the corpus and how its tokenizer is made."""
    t = recipe.tokenizer
    return {"pretrain.corpus": recipe.pretrain.corpus, "tokenizer.kind": t.kind,
            **({} if t.kind == "gpt2" else {"tokenizer.corpus_chars": t.corpus_chars, "tokenizer.vocab_size": t.vocab_size})}


def _preparation(out: Path) -> dict[str, object] | None:
    """What ``out``'s tokenizer and shards were prepared from, if recorded."""
    path = out / PREPARED
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        raise ValueError(f"{path} is damaged; delete it together with tokenizer.bpe and shards/") from None


def prepared_as(recipe: Recipe, out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a tokenizer and finished shards prepared as ``recipe`` asks: starting
    the run over keeps them (a multi-process job could not make them again)."""
    return is_prepared(out_dir) and _preparation(Path(out_dir)) == _wanted(recipe)


def micro_batch(recipe: Recipe, world_size: int = 1) -> tuple[int, int]:
    """Sequences per micro-batch per process, and micro-batches per step, that make up the recipe's
    ``total_batch_tokens`` on ``world_size`` processes: the same tokens per optimizer step (the same
    training) however many processes share them. The recipe's batch_size is the most one process
    takes at once; more processes than that batch fills split it between them."""
    p, block = recipe.pretrain, recipe.model.block_size
    sequences, rest = divmod(p.total_batch_tokens, block * world_size)  # per process per step
    batch = min(p.batch_size, sequences)
    if rest or not sequences or sequences % batch:
        raise ValueError(
            f"pretrain.total_batch_tokens={p.total_batch_tokens} does not split into micro-batches of at most "
            f"pretrain.batch_size={p.batch_size} sequences of model.block_size={block} tokens on {world_size} "
            f"process(es); make it a multiple of batch_size x block_size x processes = {p.batch_size * block * world_size}")
    return batch, sequences // batch


def train_config(recipe: Recipe, world_size: int = 1, **overrides: Any) -> TrainConfig:
    """Pretraining's Trainer settings from ``recipe``; ``grad_accum`` makes up ``total_batch_tokens``
    (:func:`micro_batch`), so it is not a setting of its own."""
    if "grad_accum" in overrides:
        raise ValueError("pretraining sets grad_accum from pretrain.total_batch_tokens (the tokens per optimizer "
                         "step); set that instead, e.g. --pretrain.total_batch_tokens 262144")
    p = recipe.pretrain
    batch, grad_accum = micro_batch(recipe, world_size)
    # The Trainer shares eval_steps batches out between the processes; counted in batches of the
    # recipe's size, so that a split micro-batch reads the same validation tokens, not fewer.
    eval_steps = overrides.pop("eval_steps", TrainConfig.eval_steps) * p.batch_size // batch
    return TrainConfig.from_recipe(recipe, **{**dict(
        max_steps=p.steps, grad_accum=grad_accum, learning_rate=p.learning_rate,
        warmup_steps=p.warmup_steps, eval_interval=p.eval_interval, eval_steps=eval_steps,
        sample_interval=p.eval_interval, checkpoint_interval=p.eval_interval,
        checkpoint_budget=p.checkpoint_budget), **overrides})


def pretrain(recipe: Recipe, out_dir: str | os.PathLike, *, resume: bool = True,
             progress: bool = True, **train_overrides: Any) -> Trainer:
    """Pretrain a GPT of ``recipe``'s shape on its corpus; checkpoints and metrics go to ``out_dir``.

    A run with a checkpoint in ``out_dir`` continues from it; a folder holding a run made with other
    settings is refused (:func:`~minigpt.runs.begin_run`), and so is one another run trains into
    (:func:`~minigpt.runs.run_lock`); ``resume=False`` starts over, removing the earlier run's
    checkpoints, and its tokenizer and shards unless they were prepared as the recipe asks
    (:func:`prepared_as`). ``run.json`` records the run.
    """
    ddp, device = init_distributed(recipe.device)
    out = Path(out_dir)
    info = run_info(recipe, "pretrain", train=train_overrides)
    cfg = train_config(recipe, ddp.world_size, **train_overrides)  # refused settings leave the folder as it was
    with run_lock(out) if ddp.is_main else nullcontext():
        if ddp.is_main:
            keep = ("tokenizer.bpe", "shards", PREPARED) if prepared_as(recipe, out) else ()
            begin_run(out, info, resume=resume, keep=keep)
        trainer = _train_into(out, recipe, cfg, ddp, device, resume=resume, progress=progress)
        if ddp.is_main:
            finish_run(out, info)
    return trainer


def _train_into(out: Path, recipe: Recipe, cfg: TrainConfig, ddp: Distributed, device: str, *, resume: bool,
                progress: bool) -> Trainer:
    """:func:`pretrain`'s work once the run folder is its own: data, model, and the Trainer's run."""
    tok, prepared = _prepare(recipe, out, ddp)
    torch.manual_seed(cfg.seed)
    vocab_size = model_vocab_size(recipe, tok)
    model = GPT(GPTConfig.from_recipe(recipe, vocab_size=vocab_size))
    block_size, (batch_size, _) = recipe.model.block_size, micro_batch(recipe, ddp.world_size)
    eot = tok.special_tokens[EOT]

    def sample(model: GPT) -> str:
        prompt = torch.tensor([[eot]], device=device)
        out_ids = generate(model, prompt, min(100, block_size - 1), temperature=0.8, top_k=50,
                           generator=torch.Generator(device).manual_seed(cfg.seed))
        return tok.decode(out_ids[0, 1:].tolist())

    loader = dict(batch_size=batch_size, block_size=block_size,
                  rank=ddp.rank, world_size=ddp.world_size)
    trainer = Trainer(model, cfg, ShardLoader(prepared.train, **loader), ShardLoader(prepared.val, **loader),
                      device=device, out_dir=out, ddp=ddp, bytes_per_token=prepared.bytes_per_token,
                      sample=sample, evals=hellaswag_eval(recipe, tok, ddp))
    if resume and trainer.resume() and ddp.is_main:
        print(f"resumed from {trainer.checkpoint_path} at step {trainer.step}")
    if ddp.is_main:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {vocab_size}; "
              f"{cfg.grad_accum} x {batch_size} x {block_size} tokens/step/process "
              f"on {ddp.world_size} process(es) ({cfg.parallel if ddp.world_size > 1 else 'alone'}), device {device}")
        print(trainer.mfu_note())
    trainer.fit(progress=progress)
    return trainer


def hellaswag_eval(recipe: Recipe, tok: BPETokenizer, ddp: Distributed) -> Callable[[GPT], dict[str, float]] | None:
    """The Trainer's extra evaluation where the recipe asks for HellaSwag (``pretrain.hellaswag``
    items, loaded now: offline, the run stops before it trains). The processes share the items out,
    except where the model is sharded: each forward then needs every process, so each scores all."""
    if not recipe.pretrain.hellaswag:
        return None
    from minigpt.hellaswag import load_items, score_items

    items = load_items(limit=recipe.pretrain.hellaswag)
    split = {} if recipe.parallel == "fsdp" else {"rank": ddp.rank, "world_size": ddp.world_size}

    def evaluate(model: GPT) -> dict[str, float]:
        return {"hellaswag": score_items(model, tok.encode, items, **split)["acc_norm"]}
    return evaluate


def prepare_data(recipe: Recipe, out_dir: str | os.PathLike, *, workers: int = 1) -> tuple[BPETokenizer, PreparedCorpus]:
    """The recipe's tokenizer and token shards in ``out_dir`` (made once, then read; ``workers``
    processes tokenize: ``minigpt prepare`` gives it every core)."""
    out = Path(out_dir)
    tok = pretrain_tokenizer(recipe, out)
    prepared = prepare_corpus(recipe.pretrain.corpus, partial(encode_ordinary, tok.encoding), tok.special_tokens[EOT],
                              out / "shards", workers=workers)
    return tok, prepared


def encode_ordinary(encoding: tiktoken.Encoding, texts: Sequence[str]) -> list[list[int]]:
    """Corpus text as ordinary text (a literal ``<|endoftext|>`` in it is not the special token), one
    text after another: tiktoken's own batch call starts a thread pool per call, which costs more than
    it gains on a worker process's batch of short documents. A module function, so it pickles."""
    return [encoding.encode_ordinary(text) for text in texts]


def is_prepared(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a tokenizer and finished token shards (:func:`prepare_data`)."""
    out = Path(out_dir)
    return (out / "tokenizer.bpe").exists() and corpus_prepared(out / "shards")


def model_vocab_size(recipe: Recipe, tokenizer: BPETokenizer) -> int:
    """The model's vocabulary: the tokenizer's, or the recipe's padded size for GPT-2's tokenizer."""
    t = recipe.tokenizer
    return max(tokenizer.vocab_size, t.vocab_size if t.kind == "gpt2" else 0)


def _prepare(recipe: Recipe, out: Path, ddp: Distributed) -> tuple[BPETokenizer, PreparedCorpus]:
    """The tokenizer and shards: made here by a single process, only read by a multi-process job.

    Tokenizing inside a job would keep every other rank waiting on a barrier that times out long
    before a large corpus is done (NCCL's watchdog allows 10 minutes, FineWeb takes hours on
    one process), so a job whose data is not ready stops at once and names the command that makes it.
    """
    if ddp.world_size > 1 and not is_prepared(out):
        raise MinigptError(f"{out} has no finished token shards, and {ddp.world_size} processes do not tokenize "
                           f"a corpus: run `minigpt prepare --profile {recipe.name} --out {out}` (one process, every "
                           "core, resumable), then this command again")
    return prepare_data(recipe, out)



