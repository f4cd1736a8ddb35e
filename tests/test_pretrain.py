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
    outcome.check("pretrain: first loss", records[0]["loss"], ">", 5.8)  # spread 6.229 .. 6.236 (5 runs)
    outcome.check("pretrain: val loss at step 40", records[-1]["val_loss"], "<", 5.5)  # spread 5.396 .. 5.401 (5 runs)
    outcome.check("pretrain: val nats per byte at step 40", records[-1]["val_nats_per_byte"], "<", 3.0)  # spread 2.768 .. 2.771 (5 runs)


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
