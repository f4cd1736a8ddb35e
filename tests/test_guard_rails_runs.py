"""Guard rails of training runs (issue 20): a diverged run stops before it can save, run folders are
validated before they change, a half-written metrics line is expected, one run at a time trains into
a folder, and a checkpoint's header cannot ask for more memory than its file holds."""

import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import minigpt
from minigpt import checkpoint
from minigpt.chat import with_chat_tokens
from minigpt.checkpoint import (
    CheckpointError,
    checkpoint_config,
    checkpoint_state,
    load_checkpoint,
    save_checkpoint,
)
from minigpt.model import GPT, GPTConfig
from minigpt.pretrain import pretrain
from minigpt.runs import LOCK_FILE, RunLocked, load_run, read_history, read_run, run_lock
from minigpt.sft import sft
from minigpt.shards import ShardLoader, write_shard
from minigpt.tasks import arithmetic
from minigpt.train import DamagedMetrics, TrainConfig, Trainer, TrainingDiverged

CONFIG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
TINY = {"pretrain.steps": 4, "pretrain.eval_interval": 2, "pretrain.warmup_steps": 1,
        "tokenizer.corpus_chars": 20_000, "tokenizer.vocab_size": 300}


def _trainer(tmp_path, out, **cfg):
    shard = write_shard(tmp_path / "data.bin", np.tile(np.random.default_rng(0).integers(0, 64, 50), 400))
    torch.manual_seed(0)
    settings = dict(warmup_steps=2, log_interval=10, eval_interval=0, checkpoint_interval=0) | cfg
    return Trainer(GPT(CONFIG), TrainConfig(**settings), ShardLoader([shard], 4, 16), out_dir=out)


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A finished tiny pretraining run; tests work on copies of it."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    pretrain(minigpt.recipe("ci", TINY), out, progress=False)
    return out


# -- 1. a non-finite loss or gradient norm stops the run, and nothing non-finite is saved ----------

def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    out = tmp_path / "run"
    _trainer(tmp_path, out, max_steps=30).fit(progress=False)
    good = (out / "checkpoint.safetensors").read_bytes()
    blowup = _trainer(tmp_path, out, max_steps=60, learning_rate=1e4, grad_clip=0.0)
    assert blowup.resume()
    with pytest.raises(TrainingDiverged, match=r"diverged at step (3[1-9]|[45]\d|60): loss .*gradient norm .*"
                                               r"learning rate too high .*grad_clip=0\.0.*overflow \(dtype=float32\).*"
                                               r"checkpoint\.safetensors is untouched \(step 30\)"):
        blowup.fit(progress=False)
    assert (out / "checkpoint.safetensors").read_bytes() == good
    assert all(math.isfinite(r["loss"]) for r in read_history(out))
    assert not list(out.glob("*.tmp"))


def test_a_learning_rate_of_30_from_scratch_exits_non_zero_without_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in TINY.items() if k != "pretrain.steps"]
    proc = subprocess.run([sys.executable, "-m", "minigpt", "pretrain", "--profile", "ci", "--out", str(out), *args,
                           "--pretrain.steps", "30", "--pretrain.learning_rate", "30", "--train.sample_interval", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "training diverged at step" in proc.stderr and "nothing was saved" in proc.stderr
    assert not (out / "checkpoint.safetensors").exists() and read_run(out).finished is None


def test_non_finite_weights_are_never_written_over_a_checkpoint(tmp_path):
    model = GPT(CONFIG)
    path = save_checkpoint(tmp_path / "checkpoint.safetensors", model, step=1)
    good = path.read_bytes()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = math.inf
    with pytest.raises(CheckpointError, match=rf"refusing to write {path}: 1 of its tensors hold NaN or infinity "
                                              r"\(model\.transformer\.h\.0\.mlp\.c_fc\.weight\)"):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == good and not list(tmp_path.glob("*.tmp"))


def test_the_gradient_norm_is_measured_with_clipping_off(tmp_path):
    record = _trainer(tmp_path, None, max_steps=1, grad_clip=0.0).train_step()
    assert record["grad_norm"] > 0


# -- 6. a refused command leaves the run folder as it was -----------------------------------------

def test_a_refused_lora_sft_leaves_the_full_sft_run_loadable(ci, base_tok, tmp_path):
    out = tmp_path / "sft"
    base = GPT(GPTConfig(block_size=32, vocab_size=base_tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    data = dict(tokenizer=base_tok, train=arithmetic(64), test=arithmetic(8, split="test"), batch_size=16, max_steps=2,
                progress=False)
    sft(ci, base, out, **data)
    before = _files(out)
    with pytest.raises(ValueError, match=r"holds a run made otherwise \(its stage is sft, not lora\); choose another output folder$"):
        sft(ci, base, out, lora=True, **data)
    assert _files(out) == before
    model, tok = load_run(out)
    assert tok.vocab_size == with_chat_tokens(base_tok).vocab_size and not model.training


def test_a_refused_restart_leaves_the_run_as_it_was(pretrained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    before = _files(out)
    with pytest.raises(ValueError, match="dtype='float8' must be one of auto, float32"):
        pretrain(minigpt.recipe("ci", TINY), out, resume=False, progress=False, dtype="float8")
    assert _files(out) == before
    load_run(out)


# -- 7. metrics.jsonl: a half-written last line is expected, a damaged one before it is not -------

def test_a_half_written_last_metrics_line_is_dropped_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    _trainer(tmp_path, out, max_steps=30).fit(progress=False)
    metrics = out / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 40, "loss": 5.1, "l')  # killed while writing step 40's line
    assert [r["step"] for r in read_history(out)] == [10, 20, 30]
    assert f"dropping the half-written last line of {metrics}" in capsys.readouterr().out
    resumed = _trainer(tmp_path, out, max_steps=30)
    assert resumed.resume() and [r["step"] for r in resumed.history] == [10, 20, 30]
    assert f"dropping the half-written last line of {metrics}" in capsys.readouterr().out
    assert metrics.read_text() == whole  # rewritten without it


def test_a_damaged_metrics_line_before_the_last_names_the_file_and_the_line(tmp_path):
    out = tmp_path / "run"
    _trainer(tmp_path, out, max_steps=30).fit(progress=False)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[1][:12], lines[2]]) + "\n")
    with pytest.raises(DamagedMetrics, match=rf"{metrics}, line 2, is not a JSON record .*delete that line"):
        read_history(out)
    with pytest.raises(DamagedMetrics, match=rf"{metrics}, line 2"):
        _trainer(tmp_path, out, max_steps=30).resume()


# -- 8. one run at a time trains into a folder -----------------------------------------------------

def test_a_second_run_on_a_folder_in_use_is_refused_saying_who_holds_it(pretrained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    before = _files(out)
    with run_lock(out):
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match=rf"{out} is in use by another run \(pid {os.getpid()} on "
                                            rf"{socket.gethostname()}, since {holder['since']}, holding "):
            pretrain(minigpt.recipe("ci", TINY), out, progress=False)
    assert not (out / LOCK_FILE).exists()  # released
    assert _files(out) == before
    pretrain(minigpt.recipe("ci", TINY), out, progress=False)  # free again: resumes (finished, nothing to do)


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    killed = subprocess.run([sys.executable, "-c", "import os, signal, sys\nfrom minigpt.runs import run_lock\n"
                             "with run_lock(sys.argv[1]):\n    print(os.getpid(), flush=True)\n"
                             "    os.kill(os.getpid(), signal.SIGKILL)", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == int(killed.stdout)
    with run_lock(tmp_path):
        said = capsys.readouterr().out
        assert f"taking over {tmp_path / LOCK_FILE}, left by pid {killed.stdout.strip()} on" in said
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_each_writer_has_its_own_temporary_file(tmp_path, monkeypatch):
    written = []
    real = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", lambda t, name, metadata: written.append(name) or real(t, name, metadata))
    path = save_checkpoint(tmp_path / "checkpoint.safetensors", GPT(CONFIG), step=1)
    assert written == [f"{path}.{os.getpid()}.tmp"] and not list(tmp_path.glob("*.tmp"))


# -- a checkpoint's header cannot ask for more memory than its file holds ---------------------------

def _meta(config):
    return {"format": "minigpt-checkpoint", "version": "1", "minigpt": json.dumps({"config": config, "state": {}})}


def test_a_header_config_asking_for_550_gb_is_refused_before_allocation(tmp_path):
    # The token embedding alone would be 1e6 x 137,500 float32 numbers: 550 GB.
    config = {"block_size": 64, "vocab_size": 1_000_000, "n_layer": 1, "n_head": 1, "n_embd": 137_500}
    path = tmp_path / "checkpoint.safetensors"
    save_file({"model.transformer.wte.weight": torch.zeros(4, 4)}, str(path), metadata=_meta(config))
    (tmp_path / "run.json").write_text(json.dumps({"format": "minigpt-run 1", "stage": "pretrain", "profile": "ci",
                                                   "settings": {}, "parent": None, "code": "0", "extra": {}}))
    refused = rf"{path} claims a model of [\d,]+ parameters \(.* GB in float32\) but holds 16 weights"
    for load in (checkpoint_config, load_checkpoint, load_run):
        with pytest.raises(CheckpointError, match=refused):
            load(path.parent if load is load_run else path)


def test_a_tensor_header_asking_for_550_gb_is_refused_with_the_files_name(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    blob = json.dumps({"__metadata__": _meta(CONFIG.__dict__),
                       "model.x": {"dtype": "F32", "shape": [137_500_000_000], "data_offsets": [0, 550_000_000_000]}})
    path.write_bytes(struct.pack("<Q", len(blob)) + blob.encode() + bytes(16))
    for read in (checkpoint_state, load_checkpoint):
        with pytest.raises(ValueError, match=rf"{path} is not a readable checkpoint"):
            read(path)



def test_an_rl_update_with_a_non_finite_gradient_stops_before_it_spoils_the_policy() -> None:
    """The RL loops step through :class:`~minigpt.rlhf.core.Stepper`: a NaN loss stops the stage
    with the learning rate to lower, and the weights stay as they were."""
    from minigpt.rlhf.core import Stepper

    torch.manual_seed(0)
    model = GPT(CONFIG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stepper = Stepper(model, learning_rate=1e-3, max_steps=10)
    x = torch.randint(0, CONFIG.vocab_size, (2, 8))
    _, loss = model(x, x)
    stepper.step(loss)  # a finite step updates
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, loss = model(x, x)
    with pytest.raises(TrainingDiverged, match=r"update 2: gradient norm nan.*learning_rate"):
        stepper.step(loss * float("nan"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
