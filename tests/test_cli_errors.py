"""The command line's error boundary: an ordinary mistake ends as one line on stderr and exit status
2 (Ctrl-C: 130), never a traceback; ``--debug`` lets the exception through. Also the guard rails of
decoding (a NaN model, ``top_p`` out of range) and of ``minigpt chat``'s flags."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch

import minigpt
from minigpt.cli import main
from minigpt.errors import MinigptError, NaNLogitsError
from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import BPETokenizer


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``minigpt: error:`` line the command wrote to stderr (progress bars aside)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("minigpt:")]
    assert len(lines) == 1 and lines[0].startswith("minigpt: error: "), err
    assert err.rstrip().endswith(lines[0]), err
    return lines[0]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A corpus for `minigpt tokenizer train --input`: trains in a blink, offline."""
    path = tmp_path / "text.txt"
    path.write_text("to be or not to be, that is the question " * 20)
    return path


def train_tokenizer(text_file: Path, out: Path | str) -> int:
    return main(["tokenizer", "train", "--profile", "ci", "--input", str(text_file),
                 "--tokenizer.vocab_size", "270", "--out", str(out)])


# -- the file system ----------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_and_cache(tmp_path, text_file, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["pretrain", "--profile", "ci", "--out", str(locked / "run")]) == 2
        assert f"Permission denied: {locked / 'run'}; choose a folder you can write" in error_line(capsys)
        assert train_tokenizer(text_file, locked / "my.tok") == 2
        assert "Permission denied" in error_line(capsys)
        monkeypatch.setenv("MINIGPT_CACHE", str(locked / "cache"))
        assert main(["pretrain", "--profile", "ci", "--out", str(tmp_path / "run")]) == 2
        assert "MINIGPT_CACHE" in error_line(capsys)
    finally:
        locked.chmod(0o700)


def test_unwritable_file_names_the_path_and_what_to_do(tmp_path, text_file, capsys, monkeypatch):
    """The read-only case as root sees it too: the OS refuses the write."""
    def refuse(self: BPETokenizer, path: str) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(BPETokenizer, "save", refuse)
    assert train_tokenizer(text_file, tmp_path / "my.tok") == 2
    assert error_line(capsys) == (f"minigpt: error: Permission denied: {tmp_path / 'my.tok'}; choose a folder you can "
                                  "write: another --out, or MINIGPT_CACHE for minigpt's cache")


def test_full_disk(tmp_path, text_file, capsys, monkeypatch):
    def full(self: BPETokenizer, path: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(BPETokenizer, "save", full)
    assert train_tokenizer(text_file, tmp_path / "my.tok") == 2
    line = error_line(capsys)
    assert line.startswith("minigpt: error: No space left on device; free some space")


def test_out_is_a_file_or_a_folder_or_under_a_file(tmp_path, text_file, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["pretrain", "--profile", "ci", "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file; give a folder" in error_line(capsys)
    assert main(["sft", "--profile", "ci", "--out", str(a_file / "run")]) == 2
    assert f"Not a directory: {a_file / 'run'}; a part of this path is a file" in error_line(capsys)
    assert train_tokenizer(text_file, tmp_path) == 2
    assert f"--out {tmp_path} is a folder; give a file name" in error_line(capsys)
    assert main(["tokenizer", "encode", str(tmp_path / "nope.tok"), "hi"]) == 2
    assert f"No such file or directory: {tmp_path / 'nope.tok'}" in error_line(capsys)
    assert main(["eval", "hellaswag", "gpt2", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder; give a file name, such as {tmp_path / 'result.json'}" in error_line(capsys)


def test_tokenizer_input_that_is_empty_or_not_text(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"ab\xff\xfecd")
    for name, message in (("empty.txt", "is empty: give a text file"), ("binary.txt", "is not UTF-8 text")):
        assert train_tokenizer(tmp_path / name, tmp_path / "t.tok") == 2
        assert f"--input {tmp_path / name} {message}" in error_line(capsys)


def test_broken_pipe_is_no_error(monkeypatch, capsys):
    """`minigpt recipe | head`: the reader leaves early."""
    read, write = os.pipe()
    os.close(read)
    with open(write, "w", buffering=1) as gone:
        monkeypatch.setattr(sys, "stdout", gone)
        assert main(["recipe", "--profile", "ci"]) == 1
    assert capsys.readouterr().err == ""


# -- the recipe's settings --------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "message"), [
    (["--pretrain.corpus", "nope"], "pretrain.corpus='nope' is not a corpus; choose one of shakespeare,"),
    (["--pretrain.batch_size", "0"], "pretrain.batch_size=0 must be at least 1"),
    (["--model.n_head", "0"], "model.n_head=0 must be at least 1"),
    (["--compile", "maybe"], "compile='maybe' is not a bool: give true or false"),
    (["--device", "gpu"], "device='gpu' is not a torch device"),
    (["--sft.n_test", "-16"], "sft.n_test=-16 must be at least 1, or None for all there are"),
    (["--rlhf.ppo.num_mini_batches", "0"], "num_mini_batches=0 must be at least 1"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, capsys, setting, message):
    assert main(["pretrain", "--profile", "ci", "--out", str(tmp_path / "run"), *setting]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_device_this_machine_lacks(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sft", "--profile", "ci", "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "device='cuda', but torch" in error_line(capsys)
    assert main(["recipe", "--profile", "ci", "--device", "cuda"]) == 0  # showing the settings needs no GPU


# -- the boundary itself ------------------------------------------------------------------------

def test_user_errors_are_one_line_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")

    def fail_with(err: BaseException):
        def pretrain(*args: object, **kwargs: object) -> None:
            raise err
        monkeypatch.setattr("minigpt.pretrain.pretrain", pretrain)

    fail_with(MinigptError("the run diverged at step 7: lower --pretrain.learning_rate"))
    assert main(["pretrain", "--profile", "ci", "--out", out]) == 2
    assert error_line(capsys) == "minigpt: error: the run diverged at step 7: lower --pretrain.learning_rate"
    with pytest.raises(MinigptError):
        main(["--debug", "pretrain", "--profile", "ci", "--out", out])
    with pytest.raises(MinigptError):
        main(["pretrain", "--profile", "ci", "--out", out, "--debug"])
    monkeypatch.setenv("MINIGPT_DEBUG", "1")
    with pytest.raises(MinigptError):
        main(["pretrain", "--profile", "ci", "--out", out])
    monkeypatch.delenv("MINIGPT_DEBUG")

    fail_with(ModuleNotFoundError("No module named 'datasets'", name="datasets"))
    assert main(["pretrain", "--profile", "ci", "--out", out]) == 2
    assert error_line(capsys).endswith("No module named 'datasets'; install it: pip install 'minigpt[data]'")

    fail_with(KeyboardInterrupt())
    assert main(["pretrain", "--profile", "ci", "--out", out]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "minigpt: interrupted (run the same command again to resume from the last checkpoint)"
    assert main(["pretrain", "--profile", "ci", "--out", out, "--restart"]) == 130  # the same command would start over
    assert "(run it again without --restart to resume" in capsys.readouterr().err

    fail_with(ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        main(["pretrain", "--profile", "ci", "--out", out])

    assert main(["recipe", "--sft.steps"]) == 2
    assert error_line(capsys) == "minigpt: error: --sft.steps needs a value, such as --sft.steps=VALUE"
    assert main(["prepare", "--profile", "ci", "--out", out, "--workers", "-1"]) == 2
    assert "--workers -1 must be at least 1" in error_line(capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["prepare", "--profile", "ci", "--out", out]) == 2
    assert "without torchrun" in error_line(capsys)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--no-such-flag"])  # argparse's own usage error
    assert exit_.value.code == 2


# -- minigpt chat --------------------------------------------------------------------------------

@pytest.fixture
def chat_run(tmp_path, tok, monkeypatch):
    """A run folder whose loading gives a tiny model for ``tok``; returns a function that swaps the
    model (a NaN one, one of another vocabulary)."""
    from minigpt.runs import run_info, write_run

    folder = tmp_path / "chat"
    folder.mkdir()
    write_run(folder, run_info(minigpt.recipe("ci"), "sft"))  # chat reads the stage first
    torch.manual_seed(0)
    loaded = {"model": GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))}
    monkeypatch.setattr("minigpt.runs.load_run", lambda path: (loaded["model"].eval(), tok))

    def use(model: GPT) -> Path:
        loaded["model"] = model
        return folder

    return folder, use


def typed(monkeypatch: pytest.MonkeyPatch, *lines: str | type[BaseException]) -> None:
    """What the user types at the chat prompt, line by line (an exception class is raised there)."""
    it = iter(lines)

    def read(prompt: str = "") -> str:
        line = next(it)
        if isinstance(line, type):
            raise line
        return line

    monkeypatch.setattr("builtins.input", read)


@pytest.mark.parametrize(("flags", "message"), [
    (["--temperature", "-1"], "temperature=-1 must be >= 0 (0 is greedy)"),
    (["--temperature", "nan"], "temperature=nan must be >= 0 (0 is greedy)"),
    (["--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    (["--top-p", "0"], "top_p=0 must be in (0, 1]"),
    (["--max-new-tokens", "0"], "max_new_tokens=0 must be at least 1"),
])
def test_chat_checks_its_flags_before_the_first_message(chat_run, monkeypatch, capsys, flags, message):
    folder, _ = chat_run
    typed(monkeypatch)  # no line at all: the prompt must not be reached
    assert main(["chat", str(folder), *flags]) == 2
    assert message in error_line(capsys)


def test_chat_needs_a_run_folder(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "nope")]) == 2
    assert "is not a run folder" in error_line(capsys)
    assert main(["chat", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a run folder" in error_line(capsys)
    (tmp_path / "grpo").mkdir()  # a folder of runs, as `minigpt rlhf` makes: the message names them
    (tmp_path / "grpo" / "run.json").write_text("{}")
    assert main(["chat", str(tmp_path)]) == 2
    assert f"the runs in it: {tmp_path / 'grpo'}" in error_line(capsys)


def test_chat_refuses_a_pretraining_run_and_a_reward_model_with_what_to_do(ci, tmp_path, capsys):
    from minigpt.runs import run_info, write_run

    for stage, message in (("pretrain", "is a pretraining run: it continues text"),
                           ("reward", "is a reward model: it scores answers and does not write them")):
        (tmp_path / stage).mkdir()
        write_run(tmp_path / stage, run_info(ci, stage, module="minigpt.pretrain"))
        assert main(["chat", str(tmp_path / stage)]) == 2
        assert message in error_line(capsys)


def test_rlhf_flags_of_another_stage_are_refused(tmp_path, capsys):
    assert main(["rlhf", "grpo", "--profile", "ci", "--plain", "--out", str(tmp_path / "g")]) == 2
    assert "--plain is a setting of the dpo stage, not of grpo" in error_line(capsys)


def test_ctrl_c_at_the_chat_prompt(chat_run, monkeypatch, capsys):
    folder, _ = chat_run
    typed(monkeypatch, KeyboardInterrupt)
    assert main(["chat", str(folder)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "minigpt: interrupted" and "Traceback" not in err


def test_chat_refuses_a_tokenizer_the_model_does_not_know(chat_run, tok, monkeypatch, capsys):
    _, use = chat_run
    folder = use(GPT(GPTConfig(vocab_size=tok.vocab_size - 10, block_size=32, n_layer=1, n_head=2, n_embd=16)))
    typed(monkeypatch, "hi")
    assert main(["chat", str(folder)]) == 2
    assert f"the tokenizer has {tok.vocab_size} tokens but the model only {tok.vocab_size - 10}" in error_line(capsys)


def nan_model(vocab_size: int = 40) -> GPT:
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    return model


def test_chat_with_a_nan_model_stops_with_a_message(chat_run, tok, monkeypatch, capsys):
    _, use = chat_run
    folder = use(nan_model(tok.vocab_size))
    typed(monkeypatch, "hi", "/quit")
    assert main(["chat", str(folder), "--temperature", "0"]) == 2
    assert "logits are NaN" in error_line(capsys)


# -- decoding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(temperature=0, stop_tokens=[3]),
                                    dict(temperature=0, use_cache=False), dict(temperature=0.8)])
def test_decoding_a_nan_model_raises(kwargs):
    with pytest.raises(NaNLogitsError, match="logits are NaN"):
        generate(nan_model(), torch.tensor([[1, 2]]), 4, **kwargs)


@pytest.mark.parametrize("bad", [dict(top_p=1.5), dict(top_p=0.0), dict(top_p=-0.1), dict(min_p=-0.1)])
def test_out_of_range_filters_raise(bad):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="must be in"):
        generate(model, torch.tensor([[1, 2]]), 2, **bad)
    generate(model, torch.tensor([[1, 2]]), 2, top_p=1.0, min_p=0.0)  # the bounds that turn them off
