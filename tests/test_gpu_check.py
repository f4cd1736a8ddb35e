"""bench/gpu_check.py's CPU mode: every part of the GPU check runs (the real Trainer on synthetic
shards, SDPA's kernel, evaluation, checkpoint, sampling, 2-process DDP and FSDP over gloo), so a lent GPU's
few minutes are not lost to a script that fails. Eager only: compiling on a CPU takes a minute."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
assert _spec and _spec.loader
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_part(tmp_path: Path) -> None:
    report = gpu_check.main(["--cpu", "--no-compile", "--steps", "2", "--eval-steps", "2",
                             "--out", str(tmp_path / "check.json")])
    assert (tmp_path / "check.json").is_file()
    assert report["flash"], f"SDPA took no flash kernel on the CPU: {report['attention_kernels']}"
    eager = report["eager"]
    assert math.isfinite(eager["final_loss"]) and eager["tokens_per_s"] > 0
    assert eager["mfu"] is None  # no peak is known for a CPU, and none is made up
    assert report["eval_s"] > 0 and report["checkpoint_mb"] > 0 and report["sample_100_tokens_s"] > 0
    for parallel in ("ddp", "fsdp"):
        run = report[parallel]
        assert isinstance(run, dict), run  # otherwise the reason it failed
        assert run["processes"] == 2 and run["parallel"] == parallel and math.isfinite(run["final_loss"])
    # the same seed, data and arithmetic: the same loss, up to the order of floating-point sums
    assert report["fsdp"]["final_loss"] == pytest.approx(report["ddp"]["final_loss"], rel=1e-4)
