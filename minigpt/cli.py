"""The ``minigpt`` command line: each chapter's step as a command, with the same names."""

from __future__ import annotations

import argparse
import dataclasses
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"minigpt: error: {err}", file=sys.stderr)
        return 2
    return 0
