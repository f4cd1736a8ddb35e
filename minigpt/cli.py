"""The ``minigpt`` command line: each chapter's step as a command, with the same names."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

from minigpt.profiles import profile


def _cmd_profile(args: argparse.Namespace) -> None:
    for field, value in dataclasses.asdict(profile(args.profile)).items():
        print(f"{field:>14} = {value}")


def _cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from minigpt.data import shakespeare_text
    from minigpt.tokenizer import train_bpe

    p = profile(args.profile)
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            text = f.read()
    else:
        text = shakespeare_text(args.max_chars or p.corpus_chars)
    vocab_size = args.vocab_size or p.vocab_size
    start = time.perf_counter()
    tok = train_bpe(text, vocab_size, special_tokens=args.special, progress=True)
    elapsed = time.perf_counter() - start
    tok.save(args.out)
    ids = tok.encode(text, allowed_special="all")
    print(f"trained vocab {tok.vocab_size} on {len(text):,} chars in {elapsed:.1f} s; "
          f"{len(text.encode('utf-8')) / len(ids):.2f} bytes/token; saved to {args.out}")


def _cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    from minigpt.tokenizer import BPETokenizer

    tok = BPETokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)
    print(" ".join(map(str, ids)))
    print(" | ".join(tok.decode([i]) for i in ids))


_TYPES = {"int": int, "float": float, "str": str,
          "bool": lambda v: {"true": True, "1": True, "false": False, "0": False}[v.lower()]}


def _setting_fields() -> tuple[list[dataclasses.Field], list[dataclasses.Field]]:
    """Profile fields, then TrainConfig fields the profile does not already set."""
    from minigpt.profiles import Profile
    from minigpt.train import TrainConfig

    prof = [f for f in dataclasses.fields(Profile) if f.name != "name"]
    names = {f.name for f in prof}
    return prof, [f for f in dataclasses.fields(TrainConfig) if f.name not in names]


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from minigpt.pretrain import pretrain, settings, train_config

    prof_fields, train_fields = _setting_fields()
    given = {k: v for k, v in vars(args).items() if v is not None}
    p = profile(args.profile, **{f.name: given[f.name] for f in prof_fields if f.name in given})
    train_overrides = {f.name: given[f.name] for f in train_fields if f.name in given}
    if os.environ.get("RANK", "0") == "0":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        for key, value in settings(p, train_config(p, world, **train_overrides)).items():
            print(f"{key:>20} = {value}")
    trainer = pretrain(p, args.out, resume=not args.restart, **train_overrides)
    if trainer.ddp.is_main:
        last = trainer.history[-1] if trainer.history else {}
        print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="print the sizes of a profile")
    p.add_argument("--profile", help="ci, cpu, gpu or full (default: see minigpt.profile)")
    p.set_defaults(func=_cmd_profile)

    tok = sub.add_parser("tokenizer", help="train or try a BPE tokenizer").add_subparsers(
        dest="tokenizer_command", required=True)
    t = tok.add_parser("train", help="train byte-level BPE (default corpus: Shakespeare)")
    t.add_argument("--profile", help="sizes to default to (corpus_chars, vocab_size)")
    t.add_argument("--input", help="a UTF-8 text file to train on instead of Shakespeare")
    t.add_argument("--max-chars", type=int, help="characters of Shakespeare to use")
    t.add_argument("--vocab-size", type=int, help="256 bytes + merges + special tokens")
    t.add_argument("--special", action="append", default=[], metavar="TOKEN",
                   help="a special token such as <|endoftext|> (repeatable)")
    t.add_argument("--out", required=True, help="where to save the tokenizer")
    t.set_defaults(func=_cmd_tokenizer_train)
    e = tok.add_parser("encode", help="show how a saved tokenizer splits a text")
    e.add_argument("tokenizer", help="a file written by `minigpt tokenizer train`")
    e.add_argument("text")
    e.set_defaults(func=_cmd_tokenizer_encode)

    t = sub.add_parser("pretrain", help="pretrain a GPT on the profile's corpus (works under torchrun)",
                       description="Every setting below defaults to the profile's value.")
    t.add_argument("--profile", help="ci, cpu, gpu or full (default: see minigpt.profile)")
    t.add_argument("--out", default="runs/pretrain", help="folder for checkpoints, metrics and shards")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    for field in sum(_setting_fields(), []):
        flags = dict.fromkeys((f"--{field.name.replace('_', '-')}", f"--{field.name}"))  # both spellings
        t.add_argument(*flags, dest=field.name, type=_TYPES[str(field.type)], metavar=str(field.type).upper())
    t.set_defaults(func=_cmd_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"minigpt: error: {err}", file=sys.stderr)
        return 2
    return 0
