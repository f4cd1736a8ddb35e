"""Token shards on disk and the loader that feeds them to training, on one process or many.

Shard format (the one llm.c uses, so its tools read our shards and ours read its): a header of
256 little-endian int32 -- ``[MAGIC, version, n_tokens, 0, ...]`` -- then ``n_tokens`` tokens,
uint16 for version 1 (vocabularies up to 65,536) and uint32 for version 2. Shards are
memory-mapped, so a corpus much larger than RAM trains without loading it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
_DTYPES = {1: np.uint16, 2: np.uint32}


def write_shard(path: str | os.PathLike, tokens: np.ndarray | Sequence[int]) -> Path:
    """Write one shard atomically (temp file, then rename) so a killed run never leaves half a file."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
        raise ValueError(f"token ids must lie in [0, 2**32); got {tokens.min()}..{tokens.max()}")
    version = 1 if tokens.size == 0 or tokens.max() < 2**16 else 2
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, version, tokens.size)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.dtype(_DTYPES[version]).newbyteorder("<")).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard's tokens; a foreign or truncated file is refused with its name."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"token shard {path} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path} is not a token shard: {size} bytes is shorter than the header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, n_tokens = (int(x) for x in header[:3])
    if magic != MAGIC or version not in _DTYPES:
        raise ValueError(f"{path} is not a token shard (magic {magic}, version {version})")
    dtype = np.dtype(_DTYPES[version]).newbyteorder("<")
    expected = HEADER_BYTES + n_tokens * dtype.itemsize
    if size != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header promises {n_tokens:,} tokens "
            f"({expected:,} bytes) but the file has {size:,} bytes; delete it and re-tokenize"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def tokenize_to_shards(
    documents: Iterable[str],
    encode_batch: Callable[[list[str]], list[list[int]]],
    out_dir: str | os.PathLike,
    *,
    prefix: str,
    eot: int,
    shard_tokens: int = 100_000_000,
    batch_docs: int = 1024,
    total_docs: int | None = None,
    workers: int = 1,
) -> list[Path]:
    """Tokenize documents into shards ``{prefix}_000000.bin``, ... each of ``shard_tokens`` tokens.

    Every document starts with ``eot`` (GPT-2's convention), so the model learns where one ends
    and the next begins. With ``workers`` > 1 a pool of processes encodes batches of ``batch_docs``
    documents, in order: a tokenizer holds the GIL for most of a short text, so threads barely
    scale and processes do (as build-nanogpt's and llm.c's FineWeb scripts do). ``encode_batch``
    must then be picklable where processes are spawned rather than forked (macOS, Windows).

    Resumable shard by shard: as each shard lands, ``{prefix}_progress.json`` records the shards
    written and the documents they used, and the tokens left past the last shard go to a carry
    file; a call after a killed one skips what is recorded and goes on from there.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / f"{prefix}_progress.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"shards": 0, "docs": 0, "carry": None}
    paths = [out / f"{prefix}_{i:06d}.bin" for i in range(state["shards"])]
    for path in paths:
        read_shard(path)  # a missing or damaged shard is refused by name
    pending = [np.asarray(read_shard(out / state["carry"]), dtype=np.uint32)] if state["carry"] else []
    docs_done = state["docs"]
    if total_docs is None and isinstance(documents, Sized):
        total_docs = len(documents)  # a bar with an ETA (a streamed corpus has no length: no ETA)
    progress = tqdm(total=total_docs, initial=docs_done, unit="doc", desc=f"tokenizing {prefix}")
    started, new_tokens = time.perf_counter(), 0

    def record(carry: np.ndarray) -> None:
        """The shards so far, the documents they used and the tokens past them, each file atomic."""
        name = f"{prefix}_carry_{len(paths):06d}.bin" if carry.size else None
        if name:
            write_shard(out / name, carry)
        write_json(state_path, {"shards": len(paths), "docs": docs_done, "carry": name})
        for old in out.glob(f"{prefix}_carry_*.bin"):
            if old.name != name:
                old.unlink()

    batches = _batches(islice(documents, docs_done, None), batch_docs)
    for n_docs, tokens in _encoded(batches, encode_batch, eot, workers):
        pending.append(tokens)
        docs_done += n_docs
        new_tokens += len(tokens)
        if sum(len(t) for t in pending) >= shard_tokens:
            tokens = np.concatenate(pending)
            while len(tokens) >= shard_tokens:
                paths.append(write_shard(out / f"{prefix}_{len(paths):06d}.bin", tokens[:shard_tokens]))
                tokens = tokens[shard_tokens:]
            pending = [tokens]
            record(tokens)
        progress.update(n_docs)
        progress.set_postfix_str(f"{new_tokens / (time.perf_counter() - started):,.0f} tok/s", refresh=False)
    rest = np.concatenate(pending) if pending else np.zeros(0, dtype=np.uint32)
    if rest.size:
        paths.append(write_shard(out / f"{prefix}_{len(paths):06d}.bin", rest))
    record(np.zeros(0, dtype=np.uint32))
    progress.close()
    return paths


def write_json(path: Path, value: object) -> None:
    """Write ``value`` as JSON atomically (temp file, then rename): a record a killed run reads back."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(documents)
    while batch := list(islice(it, size)):
        yield batch


_encoder: Callable[[list[str]], list[list[int]]] | None = None  # a worker process's encode_batch


def _set_encoder(encode_batch: Callable[[list[str]], list[list[int]]]) -> None:
    global _encoder
    _encoder = encode_batch


def _encode(batch: list[str], eot: int, encode_batch: Callable[[list[str]], list[list[int]]] | None = None
            ) -> tuple[int, np.ndarray]:
    """A batch as one array, each document after an ``eot``: a compact reply from a worker."""
    tokens: list[int] = []
    for ids in (encode_batch or _encoder)(batch):  # type: ignore[misc]
        tokens.append(eot)
        tokens.extend(ids)
    return len(batch), np.array(tokens, dtype=np.uint32)


def _encoded(batches: Iterator[list[str]], encode_batch: Callable[[list[str]], list[list[int]]], eot: int,
             workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(documents, tokens)`` of each batch in order, encoded here or by ``workers`` processes
    (at most two batches each in flight, so a streamed corpus is never read ahead far)."""
    if workers <= 1:
        for batch in batches:
            yield _encode(batch, eot, encode_batch)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_encoder,
                             initargs=(encode_batch,)) as pool:
        window: deque[Future[tuple[int, np.ndarray]]] = deque()
        for batch in batches:
            window.append(pool.submit(_encode, batch, eot))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


class ShardLoader:
    """Serves (inputs, targets) batches of ``batch_size x block_size`` from a list of shards.

    All ranks of a distributed run share one position; rank r reads the r-th of the
    ``world_size`` consecutive blocks there, so the ranks never see the same tokens and sweep
    the data together. The position is two integers (shard, offset): :meth:`state_dict` saves it
    in a checkpoint and :meth:`load_state_dict` puts a resumed run exactly where the killed one
    stopped.
    """

    def __init__(self, shards: Sequence[str | os.PathLike], batch_size: int, block_size: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if not shards:
            raise ValueError("no token shards given; tokenize a corpus first")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.span = batch_size * block_size  # tokens one rank consumes per batch (+1 for targets)
        self.stride = self.span * world_size  # tokens all ranks consume per step
        paths = [Path(p) for p in shards]
        sizes = [len(read_shard(p)) for p in paths]
        # A corpus's last shard holds what was left over, often less than a step, and a step never
        # spans two shards: it is left out while others remain. Every other shard must hold a step.
        if len(paths) > 1 and sizes[-1] < self.stride + 1:
            paths, sizes = paths[:-1], sizes[:-1]
        self.paths = paths
        for path, n in zip(paths, sizes):
            if n < self.stride + 1:
                raise ValueError(
                    f"{path} holds {n:,} tokens, fewer than one step of all ranks needs "
                    f"({self.stride + 1:,}); lower batch_size or block_size"
                )
        self.shard, self.offset = 0, 0
        self._tokens = read_shard(self.paths[0])

    def reset(self) -> None:
        """Back to the first batch of the first shard."""
        self._seek(0, 0)

    def _seek(self, shard: int, offset: int) -> None:
        if shard != self.shard:
            self._tokens = read_shard(self.paths[shard])
        self.shard, self.offset = shard, offset

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.offset + self.rank * self.span
        chunk = torch.from_numpy(self._tokens[start:start + self.span + 1].astype(np.int64))
        x = chunk[:-1].view(self.batch_size, self.block_size)
        y = chunk[1:].view(self.batch_size, self.block_size)
        offset = self.offset + self.stride
        if offset + self.stride + 1 > len(self._tokens):  # the next step would run off this shard
            self._seek((self.shard + 1) % len(self.paths), 0)
        else:
            self.offset = offset
        return x, y

    def state_dict(self) -> dict[str, int]:
        """The loader's position, for a checkpoint."""
        return {"shard": self.shard, "offset": self.offset, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position :meth:`state_dict` saved (with the same number of processes)."""
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"loader state is for {state['world_size']} processes, but this run has "
                f"{self.world_size}; resume with the same number of processes"
            )
        self._seek(state["shard"], state["offset"])
