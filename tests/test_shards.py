import json
import os

import numpy as np
import pytest
import torch

from minigpt.shards import HEADER_BYTES, ShardLoader, read_shard, tokenize_to_shards, write_shard


def test_round_trip_uint16_and_uint32(tmp_path):
    small = write_shard(tmp_path / "a.bin", [0, 1, 65535])
    big = write_shard(tmp_path / "b.bin", [0, 70000])
    assert read_shard(small).dtype == np.uint16 and list(read_shard(small)) == [0, 1, 65535]
    assert read_shard(big).dtype == np.uint32 and list(read_shard(big)) == [0, 70000]
    assert small.stat().st_size == HEADER_BYTES + 3 * 2
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_and_foreign_files_are_refused_by_name(tmp_path):
    path = write_shard(tmp_path / "a.bin", np.arange(100))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"a\.bin is truncated"):
        read_shard(path)
    foreign = tmp_path / "notes.bin"
    foreign.write_bytes(b"hello" * 300)
    with pytest.raises(ValueError, match=r"notes\.bin is not a token shard"):
        read_shard(foreign)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        read_shard(tmp_path / "missing.bin")


def test_tokenize_to_shards_splits_and_prepends_eot(tmp_path):
    docs = ["ab", "cde", "f"] * 5
    encode_batch = lambda batch: [[ord(c) for c in d] for d in batch]  # noqa: E731
    paths = tokenize_to_shards(docs, encode_batch, tmp_path, prefix="train", eot=0,
                               shard_tokens=7, batch_docs=2)
    stream = np.concatenate([read_shard(p) for p in paths])
    expected = [t for d in docs for t in [0, *map(ord, d)]]
    assert stream.tolist() == expected
    assert [len(read_shard(p)) for p in paths] == [7] * (len(expected) // 7) + [len(expected) % 7]


def _shards(tmp_path, n_shards=3, n=1000):
    return [write_shard(tmp_path / f"s{i}.bin", np.arange(n) + 10_000 * i) for i in range(n_shards)]


def test_batches_are_shifted_by_one(tmp_path):
    loader = ShardLoader(_shards(tmp_path), batch_size=2, block_size=8)
    x, y = loader.next_batch()
    assert x.shape == (2, 8) and x.dtype == torch.int64
    torch.testing.assert_close(y, x + 1)


def test_ranks_read_disjoint_slices_that_cover_the_data(tmp_path):
    shards = _shards(tmp_path, n_shards=1, n=4 * 2 * 8 + 1)
    seen = []
    for rank in range(2):
        loader = ShardLoader(shards, batch_size=2, block_size=8, rank=rank, world_size=2)
        seen.append(torch.cat([loader.next_batch()[0].flatten() for _ in range(2)]))
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(torch.cat(seen).tolist()) == list(range(64))


def test_restored_state_continues_exactly(tmp_path):
    shards = _shards(tmp_path)
    a = ShardLoader(shards, batch_size=3, block_size=16, rank=1, world_size=2)
    for _ in range(25):  # crosses shard boundaries
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(10)]
    b = ShardLoader(shards, batch_size=3, block_size=16, rank=1, world_size=2)
    b.load_state_dict(state)
    for want in expected:
        torch.testing.assert_close(b.next_batch()[0], want)
    with pytest.raises(ValueError, match="same number of processes"):
        ShardLoader(shards, batch_size=3, block_size=16).load_state_dict(state)


def test_too_small_shard_is_a_clear_error_unless_it_is_the_last_of_several(tmp_path):
    with pytest.raises(ValueError, match="lower batch_size or block_size"):
        ShardLoader(_shards(tmp_path, n=50), batch_size=4, block_size=16)
    (tmp_path / "a").mkdir()
    full = _shards(tmp_path / "a", n_shards=2)
    rest = write_shard(tmp_path / "a" / "rest.bin", np.arange(20))  # what a corpus leaves over at its end
    loader = ShardLoader([*full, rest], batch_size=4, block_size=16)
    assert loader.paths == full and all(int(loader.next_batch()[0].max()) < 20_000 for _ in range(50))
    with pytest.raises(ValueError, match="rest.bin holds 20 tokens"):
        ShardLoader([full[0], rest, full[1]], batch_size=4, block_size=16)  # short, and not the last


def _letters(batch):
    return [[ord(c) for c in d] for d in batch]


def test_worker_processes_write_the_same_shards_as_one_process(tmp_path):
    docs = [f"doc {i} " + "xyz" * (i % 7) for i in range(500)]
    one = tokenize_to_shards(docs, _letters, tmp_path / "one", prefix="train", eot=0, shard_tokens=1000, batch_docs=16)
    pids = tmp_path / "pids"
    pids.mkdir()

    def noting_the_process(batch):
        (pids / str(os.getpid())).touch()
        return _letters(batch)

    two = tokenize_to_shards(docs, noting_the_process, tmp_path / "two", prefix="train", eot=0, shard_tokens=1000,
                             batch_docs=16, workers=2)
    assert str(os.getpid()) not in {p.name for p in pids.iterdir()} and len(list(pids.iterdir())) >= 1
    assert [p.name for p in one] == [p.name for p in two] and len(one) > 3
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes()


class Killed(Exception):
    pass


def test_a_killed_tokenization_resumes_from_its_last_recorded_shard(tmp_path):
    docs = [f"document {i}" for i in range(300)]
    straight = tokenize_to_shards(docs, _letters, tmp_path / "straight", prefix="train", eot=0, shard_tokens=500,
                                  batch_docs=10)
    seen = []

    def dies_after_20_batches(batch):
        if len(seen) == 20:
            raise Killed
        seen.append(batch)
        return _letters(batch)

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        tokenize_to_shards(docs, dies_after_20_batches, out, prefix="train", eot=0, shard_tokens=500, batch_docs=10)
    state = json.loads((out / "train_progress.json").read_text())
    assert 0 < state["shards"] < len(straight) and state["carry"]  # 200 documents: 2,480 tokens, 4 shards and a carry
    again = []
    paths = tokenize_to_shards(docs, lambda b: again.append(b) or _letters(b), out, prefix="train", eot=0,
                               shard_tokens=500, batch_docs=10)
    assert again[0][0] == docs[state["docs"]]  # the recorded documents are not encoded again
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in straight]
    assert not list(out.glob("train_carry_*")) and tokenize_to_shards(
        docs, dies_after_20_batches, out, prefix="train", eot=0, shard_tokens=500, batch_docs=10) == paths  # done: nothing to encode
