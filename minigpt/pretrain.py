"""Pretraining end to end, the same code on a laptop and under ``torchrun`` on GPUs:
corpus -> tokenizer -> token shards -> GPT -> :class:`~minigpt.train.Trainer`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from minigpt.checkpoint import load_checkpoint
from minigpt.data import CORPORA, PreparedCorpus, cache_dir, prepare_corpus
from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig
from minigpt.profiles import Profile
from minigpt.shards import ShardLoader
from minigpt.tokenizer import BPETokenizer, get_encoding, train_bpe
from minigpt.train import Distributed, TrainConfig, Trainer, init_distributed

EOT = "<|endoftext|>"


def pretrain_tokenizer(profile: Profile, out_dir: str | os.PathLike) -> BPETokenizer:
    """GPT-2's encoding, or a BPE trained on the corpus's training text (saved, then reused)."""
    if profile.tokenizer == "gpt2":
        return BPETokenizer.from_tiktoken(get_encoding("gpt2"))
    if profile.tokenizer != "bpe":
        raise ValueError(f"tokenizer={profile.tokenizer!r} must be 'bpe' or 'gpt2'")
    path = Path(out_dir) / "tokenizer.bpe"
    if path.exists():
        return BPETokenizer.load(path)
    train_docs, _ = CORPORA[profile.corpus].splits()
    text, size = [], 0
    for doc in train_docs:  # the first corpus_chars characters of the training split
        text.append(doc[:profile.corpus_chars - size])
        size += len(text[-1])
        if size >= profile.corpus_chars:
            break
    tok = train_bpe("".join(text), profile.vocab_size, special_tokens=[EOT])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def train_config(profile: Profile, world_size: int = 1, **overrides: Any) -> TrainConfig:
    """The profile's optimisation settings; ``grad_accum`` makes up ``total_batch_tokens``."""
    per_step = profile.batch_size * profile.block_size * world_size
    if profile.total_batch_tokens % per_step:
        raise ValueError(
            f"total_batch_tokens={profile.total_batch_tokens} is not a multiple of batch_size x "
            f"block_size x processes = {per_step}; change one of them"
        )
    base = dict(max_steps=profile.max_steps, grad_accum=profile.total_batch_tokens // per_step,
                learning_rate=profile.learning_rate, warmup_steps=profile.warmup_steps,
                eval_interval=profile.eval_interval, sample_interval=profile.eval_interval,
                dtype=profile.dtype, compile=profile.compile,
                checkpoint_interval=profile.eval_interval)
    return TrainConfig(**{**base, **overrides})


def pretrain(profile: Profile, out_dir: str | os.PathLike, *, resume: bool = True,
             progress: bool = True, **train_overrides: Any) -> Trainer:
    """Pretrain a GPT of ``profile``'s size on its corpus; checkpoints and metrics go to ``out_dir``.

    A run with a checkpoint in ``out_dir`` continues from it (``resume=False`` starts over).
    """
    ddp, device = init_distributed(profile.device)
    out = Path(out_dir)
    tok, prepared = _prepare(profile, out, ddp)
    cfg = train_config(profile, ddp.world_size, **train_overrides)
    torch.manual_seed(cfg.seed)
    vocab_size = model_vocab_size(profile, tok)
    model = GPT(GPTConfig.from_profile(profile, vocab_size=vocab_size))
    eot = tok.special_tokens[EOT]

    def sample(model: GPT) -> str:
        prompt = torch.tensor([[eot]], device=device)
        out_ids = generate(model, prompt, min(100, profile.block_size - 1), temperature=0.8, top_k=50,
                           generator=torch.Generator(device).manual_seed(cfg.seed))
        return tok.decode(out_ids[0, 1:].tolist())

    loader = dict(batch_size=profile.batch_size, block_size=profile.block_size,
                  rank=ddp.rank, world_size=ddp.world_size)
    trainer = Trainer(model, cfg, ShardLoader(prepared.train, **loader), ShardLoader(prepared.val, **loader),
                      device=device, out_dir=out, ddp=ddp, bytes_per_token=prepared.bytes_per_token,
                      sample=sample)
    if resume and trainer.resume() and ddp.is_main:
        print(f"resumed from {trainer.checkpoint_path} at step {trainer.step}")
    if ddp.is_main:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {vocab_size}; "
              f"{cfg.grad_accum} x {profile.batch_size} x {profile.block_size} tokens/step/process "
              f"on {ddp.world_size} process(es), device {device}")
    trainer.fit(progress=progress)
    return trainer


def pretrained_dir(profile: Profile) -> Path:
    """Where :func:`pretrained` keeps the run for ``profile``: a folder in the cache named by the
    profile and a hash of every setting, so a changed setting never reuses a stale model."""
    digest = hashlib.sha256(json.dumps(settings(profile, train_config(profile)), sort_keys=True).encode())
    return cache_dir() / "pretrained" / f"{profile.name}-{digest.hexdigest()[:12]}"


def pretrained(profile: Profile, *, progress: bool = True) -> tuple[GPT, BPETokenizer]:
    """The profile's pretrained model (in eval mode) and tokenizer, trained on first use.

    Later chapters start from this instead of retraining: the first call runs :func:`pretrain`
    into :func:`pretrained_dir` (resuming if a previous call was interrupted), later calls only
    load the finished checkpoint.
    """
    out = pretrained_dir(profile)
    checkpoint = out / "checkpoint.safetensors"
    if checkpoint.exists():
        model, state = load_checkpoint(checkpoint)
        if state["step"] >= profile.max_steps:  # on the device a fresh run would train on
            return model.to(profile.device).eval(), pretrain_tokenizer(profile, out)
    trainer = pretrain(profile, out, progress=progress)
    return trainer.raw_model.eval(), pretrain_tokenizer(profile, out)


def prepare_data(profile: Profile, out_dir: str | os.PathLike) -> tuple[BPETokenizer, PreparedCorpus]:
    """The profile's tokenizer and token shards in ``out_dir`` (made once, then read)."""
    out = Path(out_dir)
    tok = pretrain_tokenizer(profile, out)
    # Corpus text is ordinary text: a literal "<|endoftext|>" in it must not become the special token.
    prepared = prepare_corpus(profile.corpus, tok.encoding.encode_ordinary_batch, tok.special_tokens[EOT],
                              out / "shards")
    return tok, prepared


def model_vocab_size(profile: Profile, tokenizer: BPETokenizer) -> int:
    """The model's vocabulary: the tokenizer's, or the profile's padded size for GPT-2's tokenizer."""
    return max(tokenizer.vocab_size, profile.vocab_size if profile.tokenizer == "gpt2" else 0)


def _prepare(profile: Profile, out: Path, ddp: Distributed) -> tuple[BPETokenizer, PreparedCorpus]:
    """Rank 0 builds the tokenizer and shards while the other ranks wait, then they read them."""
    if not ddp.is_main:
        dist.barrier()
    tok, prepared = prepare_data(profile, out)
    if ddp.is_main and ddp.world_size > 1:
        dist.barrier()
    return tok, prepared


def settings(profile: Profile, cfg: TrainConfig) -> dict[str, Any]:
    """Everything a run is configured with, for printing at start."""
    return {**dataclasses.asdict(profile), **dataclasses.asdict(cfg)}
