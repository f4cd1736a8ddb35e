"""End to end through the CLI: a ci-sized run learns, and a SIGKILLed run resumes bitwise."""

import json
import os
import signal
import subprocess
import sys

import pytest

ARGS = ["--profile", "ci", "--pretrain.steps", "40", "--train.checkpoint_interval", "10", "--train.log_interval", "1",
        "--pretrain.eval_interval", "20", "--train.sample_interval", "0",
        "--seed", os.environ.get("MINIGPT_TEST_SEED", "1337")]


def _run(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "minigpt", "pretrain", "--out", str(out), *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    proc = _run(out)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    return out, log


@pytest.mark.outcome
def test_ci_pretraining_learns(straight_run, outcome):
    out, log = straight_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "pretrain.steps = 40" in log and "train.sample_interval = 0" in log  # every setting is printed at start
    # ln(512) = 6.24: uniform guessing over the vocabulary
    outcome.check("pretrain: first loss", records[0]["loss"], ">", 5.8)  # spread 6.229 .. 6.236 (6 runs)
    outcome.check("pretrain: val loss at step 40", records[-1]["val_loss"], "<", 5.5)  # spread 5.396 .. 5.401 (6 runs)
    outcome.check("pretrain: val nats per byte at step 40", records[-1]["val_nats_per_byte"], "<", 3.0)  # spread 2.768 .. 2.771 (6 runs)


@pytest.mark.outcome
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ci_pretraining_learns_as_well_in_half_precision(dtype, tmp_path, outcome):
    """What a T4 (float16, with the gradient scaler) and an A100/H100 (bfloat16) run, forced on the CPU."""
    proc = _run(tmp_path, "--train.dtype", dtype)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    outcome.check(f"pretrain {dtype}: val loss at step 40", last["val_loss"], "<", 5.5)  # spread 5.396 .. 5.401 (6 runs each)


# Kills its own process right after step 25 is logged: after the step-20 checkpoint, mid-way to the next.
# (Polling from outside raced a run this small, which can reach step 30 between two polls.)
_KILLED_AT_25 = """
import os, signal, sys
import minigpt.train as t
log = t.Trainer._log
def _log(self, record):
    log(self, record)
    if record["step"] == 25:
        os.kill(os.getpid(), signal.SIGKILL)
t.Trainer._log = _log
from minigpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkilled_run_resumes_on_the_same_loss_curve(straight_run, tmp_path):
    straight, _ = straight_run
    killed = subprocess.run([sys.executable, "-c", _KILLED_AT_25, "pretrain", "--out", str(tmp_path), *ARGS],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert max(r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())) == 25
    resumed = _run(tmp_path)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert "resumed from" in log and "at step 20" in log
    assert _losses(tmp_path) == _losses(straight)  # bitwise: the same floats, step for step


def test_sigterm_saves_after_the_step_and_exits_143_then_resumes_on_the_curve(straight_run, tmp_path):
    """A scheduler's SIGTERM (preemption, a time limit) costs no work: the step under way finishes,
    a checkpoint is written, and the command exits with 128 + SIGTERM and says how to resume."""
    straight, _ = straight_run
    termed = subprocess.run([sys.executable, "-c", _KILLED_AT_25.replace("SIGKILL", "SIGTERM"), "pretrain", "--out",
                             str(tmp_path), *ARGS], capture_output=True, text=True, timeout=300)
    assert termed.returncode == 143, termed.stdout + termed.stderr
    assert "SIGTERM stopped the run after step 26" in termed.stderr and "same command again" in termed.stderr
    resumed = _run(tmp_path)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "at step 26" in log, log
    assert _losses(tmp_path) == _losses(straight)


def test_plot_history_draws_train_and_val_curves(straight_run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minigpt.train import plot_history

    out, _ = straight_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ax = plot_history(records)
    train, val = ax.get_lines()
    assert list(train.get_xdata()) == [r["step"] for r in records]
    assert list(val.get_ydata()) == [r["val_loss"] for r in records if "val_loss" in r]
    plt.close(ax.figure)


SHORT = ["--profile", "ci", "--pretrain.steps", "6", "--pretrain.eval_interval", "6", "--train.log_interval", "1",
         "--train.sample_interval", "0"]


def _pretrain(out, *extra, processes=1):
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    return subprocess.run([sys.executable, *launch, "-m", "minigpt", "pretrain", "--out", str(out), *SHORT, *extra],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_ddp_or_fsdp_train_as_one_does(tmp_path):
    """A 2-process torchrun job refuses a corpus that is not prepared, naming the command; once
    prepared, DDP and FSDP share out the ci recipe's batch (2 x 4 sequences instead of 1 x 8) and
    trace one process's loss curve, and its validation loss, up to the order of float sums."""
    import shutil

    refused = _pretrain(tmp_path / "ddp", processes=2)
    assert refused.returncode != 0
    assert f"minigpt prepare --profile ci --out {tmp_path / 'ddp'}" in refused.stdout + refused.stderr
    prepared = subprocess.run([sys.executable, "-m", "minigpt", "prepare", "--profile", "ci", "--out",
                               str(tmp_path / "ddp"), "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    for other in ("fsdp", "one"):
        shutil.copytree(tmp_path / "ddp", tmp_path / other)
    runs = {"one": _pretrain(tmp_path / "one"), "ddp": _pretrain(tmp_path / "ddp", processes=2),
            "fsdp": _pretrain(tmp_path / "fsdp", "--parallel", "fsdp", processes=2)}
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {run.stdout[-2000:]}{run.stderr[-3000:]}"
    assert "4 x 64 tokens/step/process on 2 process(es)" in runs["ddp"].stdout
    one = _records(tmp_path / "one")
    assert len(one) == 6 and one[-1]["loss"] < one[0]["loss"]
    for name in ("ddp", "fsdp"):
        records = _records(tmp_path / name)
        for key in ("loss", "val_loss"):
            mine = [r[key] for r in records if key in r]
            assert mine == pytest.approx([r[key] for r in one if key in r], rel=1e-4), (name, key)


def test_every_profile_splits_its_step_over_1_2_4_or_8_processes():
    from minigpt.pretrain import micro_batch
    from minigpt.recipe import RECIPES

    for name, r in RECIPES.items():
        for world in (1, 2, 4, 8):
            batch, accum = micro_batch(r, world)
            assert batch <= r.pretrain.batch_size and batch * accum * r.model.block_size * world == \
                r.pretrain.total_batch_tokens, (name, world)
    with pytest.raises(ValueError, match="does not split"):
        micro_batch(RECIPES["full"], 3)
