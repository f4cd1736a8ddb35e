"""Benchmark minigpt's BPE against Hugging Face ``tokenizers``, side by side in one run.

    python bench/bench_tokenizer.py           # full Shakespeare (~5 MB), about 1-2 minutes
    python bench/bench_tokenizer.py --quick   # 1 MB and fewer rounds, for a smoke test

(a) training to the same vocabulary size with the same regex pre-split;
(b) encoding speed: our tiktoken-backed ``encode`` against an HF tokenizer built from *our*
    merges (so both must produce identical ids), plus the pure-Python ``encode_slow``.
One line per figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from minigpt.data import shakespeare_text
from minigpt.tokenizer import GPT4_SPLIT_PATTERN, BPETokenizer, train_bpe


def seconds(fn: Callable[[], object], rounds: int = 1) -> tuple[float, object]:
    """Median wall time of ``rounds`` calls, and the last result."""
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as HF's ByteLevel uses it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def hf_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Our GPT-4 regex split, then bytes -> stand-in characters."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def hf_train(paragraphs: list[str], vocab_size: int) -> Tokenizer:
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = hf_pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(paragraphs, trainer=trainer)
    return hf


def hf_from_ours(tok: BPETokenizer) -> Tokenizer:
    """An HF tokenizer with exactly our vocabulary and merges."""
    to_str = byte_to_unicode()

    def name(i: int) -> str:
        return "".join(to_str[b] for b in tok.token_bytes(i))

    vocab = {name(i): i for i in range(256 + len(tok.merges))}
    merges = [(name(a), name(b)) for a, b in tok.merges]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = hf_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 MB of text, fewer rounds")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    text = shakespeare_text(1_000_000 if args.quick else None)
    rounds = 2 if args.quick else 5
    mb = len(text.encode("utf-8")) / 1e6
    paragraphs = text.split("\n\n")
    print(f"corpus: {mb:.2f} MB of Shakespeare, vocab_size {args.vocab_size}, {rounds} encoding rounds")

    # (a) training
    t_ours, tok = seconds(lambda: train_bpe(text, args.vocab_size))
    t_hf, _ = seconds(lambda: hf_train(paragraphs, args.vocab_size))
    print(f"train minigpt (pure Python, incremental): {t_ours:7.2f} s")
    print(f"train HF tokenizers (Rust, 2 threads):    {t_hf:7.2f} s")
    print(f"train ratio minigpt/HF:                   {t_ours / t_hf:7.1f}x slower")

    # (b) encoding the whole text as one string; both must agree id for id
    hf = hf_from_ours(tok)
    t_enc, ids = seconds(lambda: tok.encode(text), rounds)
    t_hf_enc, hf_ids = seconds(lambda: hf.encode(text).ids, rounds)
    assert ids == hf_ids, "HF with our merges disagrees with our encoder"
    assert tok.decode(ids) == text
    print(f"tokens: {len(ids):,} ({mb * 1e6 / len(ids):.2f} bytes/token), ids identical to HF: yes")
    print(f"encode minigpt (tiktoken core):           {mb / t_enc:7.2f} MB/s")
    print(f"encode HF tokenizers, same merges:        {mb / t_hf_enc:7.2f} MB/s")
    print(f"encode ratio minigpt/HF:                  {t_hf_enc / t_enc:7.1f}x faster")

    # batches of paragraphs use threads on both sides
    t_b, b_ids = seconds(lambda: tok.encode_batch(paragraphs), rounds)
    t_hf_b, hf_b = seconds(lambda: [e.ids for e in hf.encode_batch(paragraphs)], rounds)
    assert b_ids == hf_b
    print(f"encode_batch minigpt, {len(paragraphs):,} paragraphs:  {mb / t_b:7.2f} MB/s")
    print(f"encode_batch HF, same paragraphs:         {mb / t_hf_b:7.2f} MB/s")
    print(f"encode_batch ratio minigpt/HF:            {t_hf_b / t_b:7.1f}x faster")
    t_b1, one = seconds(lambda: tok.encode_batch(paragraphs, num_threads=1), rounds)
    t_tt, tt_ids = seconds(lambda: tok.encoding.encode_batch(paragraphs, disallowed_special=()), rounds)
    assert one == tt_ids == b_ids
    print(f"encode_batch minigpt, 1 thread:           {mb / t_b1:7.2f} MB/s ({t_enc / t_b1:.2f} of one string's rate)")
    print(f"encode_batch minigpt threads / 1 thread:  {t_b1 / t_b:7.2f}x")
    print(f"encode_batch tiktoken's (a task per text): {mb / t_tt:6.2f} MB/s")

    sample = text[:200_000]
    t_slow, slow_ids = seconds(lambda: tok.encode_slow(sample))
    assert slow_ids == tok.encode(sample)
    print(f"encode_slow (pure Python reference):      {len(sample.encode()) / 1e6 / t_slow:7.2f} MB/s")


if __name__ == "__main__":
    main()
