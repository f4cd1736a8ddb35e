"""Benchmark ``minigpt prepare``'s tokenizing: one process against a pool, and against
build-nanogpt's FineWeb script's way (``multiprocessing.Pool.imap`` of one document per task,
chunks of 16), side by side in one run, on the same documents with GPT-2's encoding.

    python bench/bench_prepare.py            # Shakespeare's paragraphs, 4 copies (~22 MB), 2 workers
    python bench/bench_prepare.py --copies 1 --workers 4

Every way must write the same tokens. One line per figure: tokens per second, and the speed-ups.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from minigpt.data import shakespeare_text
from minigpt.pretrain import encode_ordinary
from minigpt.shards import read_shard, tokenize_to_shards
from minigpt.tokenizer import gpt2_tokenizer

_encoding = gpt2_tokenizer().encoding
EOT = _encoding.eot_token


def nanogpt_tokenize(doc: str) -> np.ndarray:
    """build-nanogpt's fineweb.py ``tokenize``: the end-of-text token, then the document, as uint16."""
    return np.array([EOT, *_encoding.encode_ordinary(doc)], dtype=np.uint16)


def nanogpt_way(docs: list[str], workers: int) -> np.ndarray:
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return np.concatenate(list(pool.imap(nanogpt_tokenize, docs, chunksize=16)))


def ours(docs: list[str], workers: int) -> np.ndarray:
    """``minigpt prepare``'s way: batches of documents to a pool, encoded as ``prepare_data`` does."""
    with tempfile.TemporaryDirectory() as out:
        paths = tokenize_to_shards(docs, partial(encode_ordinary, _encoding), Path(out), prefix="train", eot=EOT,
                                   workers=workers)
        return np.concatenate([read_shard(p) for p in paths])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=4, help="copies of Shakespeare's paragraphs")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    docs = [d for d in shakespeare_text().split("\n\n") if d.strip()] * args.copies
    print(f"{len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f} MB, {len(os.sched_getaffinity(0))} cores; "
          f"GPT-2's encoding; best of 3")
    rates, streams = {}, {}
    for name, fn, workers in (("ours, 1 process", ours, 1), (f"ours, {args.workers} processes", ours, args.workers),
                              (f"build-nanogpt's Pool.imap, {args.workers} processes", nanogpt_way, args.workers)):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            streams[name] = fn(docs, workers)
            best = min(best, time.perf_counter() - start)
        rates[name] = len(streams[name]) / best
        print(f"{name}: {rates[name] / 1e6:.2f} M tokens/s")
    first, pool, peer = rates
    same = all(np.array_equal(streams[first], s) for s in streams.values())
    print(f"{args.workers} processes / 1: {rates[pool] / rates[first]:.2f}x | ours / build-nanogpt's: "
          f"{rates[pool] / rates[peer]:.2f}x | same tokens: {same}")


if __name__ == "__main__":
    main()
