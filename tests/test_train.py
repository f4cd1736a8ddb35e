import dataclasses
import json
import math
import os
import signal
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from minigpt.checkpoint import (
    CheckpointError,
    checkpoint_config,
    checkpoint_state,
    load_checkpoint,
    save_checkpoint,
)
from minigpt.model import GPT, GPTConfig
from minigpt.shards import ShardLoader, write_shard
from minigpt.train import (
    Distributed,
    TrainConfig,
    Trainer,
    autocast_dtype,
    kept_checkpoint_path,
    lr_at,
    peak_flops,
    read_metrics,
)

CONFIG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def _shard(tmp_path, n=20_000, seed=0):
    # A learnable stream: a fixed random sequence of 50 tokens, repeated.
    rng = np.random.default_rng(seed)
    return write_shard(tmp_path / f"data{seed}.bin", np.tile(rng.integers(0, 64, 50), n // 50))


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(CONFIG)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_gradient_accumulation_1x8_equals_8x1(tmp_path):
    # Compare the gradients the optimizer sees: Adam's update is nearly scale-free, so comparing
    # weights after the step would not notice a missing division by grad_accum.
    shard = _shard(tmp_path)
    grads = []
    for batch, accum in [(8, 1), (1, 8)]:
        cfg = TrainConfig(max_steps=1, grad_accum=accum, warmup_steps=0, grad_clip=0.0)
        trainer = Trainer(_model(), cfg, ShardLoader([shard], batch, CONFIG.block_size))
        trainer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
        trainer.train_step()
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_training_learns_and_logs(tmp_path):
    shard = _shard(tmp_path)
    cfg = TrainConfig(max_steps=60, warmup_steps=5, learning_rate=3e-3, eval_interval=30, eval_steps=2,
                      log_interval=10, checkpoint_interval=0)
    trainer = Trainer(_model(), cfg, ShardLoader([shard], 4, 16), ShardLoader([shard], 4, 16),
                      out_dir=tmp_path / "run", bytes_per_token=2.0)
    history = trainer.fit(progress=False)
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    assert history[-1]["val_loss"] < 2.5  # uniform guessing is ln 64 = 4.16
    assert history[-1]["val_bpb"] == pytest.approx(history[-1]["val_loss"] / 2.0 / math.log(2))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30, 40, 50, 60]
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # float16: the gradient scaler's state resumes too
def test_resume_continues_the_same_loss_curve_bitwise(tmp_path, dtype):
    shard = _shard(tmp_path)
    cfg = TrainConfig(max_steps=12, warmup_steps=2, log_interval=1, eval_interval=0, checkpoint_interval=6,
                      dtype=dtype)
    config = GPTConfig(**{**CONFIG.__dict__, "dropout": 0.1})  # RNG state matters with dropout

    def trainer(out):
        torch.manual_seed(0)
        return Trainer(GPT(config), cfg, ShardLoader([shard], 4, 16), out_dir=out)

    straight = [r["loss"] for r in trainer(tmp_path / "a").fit(progress=False)]
    killed = trainer(tmp_path / "b")
    log = killed._log

    def log_then_die(record):  # dies at step 8, after the checkpoint of step 6
        log(record)
        if record["step"] == 8:
            raise KeyboardInterrupt

    killed._log = log_then_die
    with pytest.raises(KeyboardInterrupt):
        killed.fit(progress=False)
    torch.manual_seed(123)  # a resumed process starts with different RNG state
    resumed = trainer(tmp_path / "b")
    assert resumed.resume() and resumed.step == 6
    resumed.fit(progress=False)
    assert [r["loss"] for r in resumed.history] == straight
    if dtype == "float16":  # a scale the run had found is kept, not reset to the initial 65536
        resumed.scaler.update(1024.0)
        resumed.save()
        again = trainer(tmp_path / "b")
        assert again.resume() and again.scaler.get_scale() == 1024.0


def test_autocast_dtype_follows_the_device(monkeypatch):
    assert autocast_dtype("auto", "cpu") is None  # float32: half precision saves a CPU nothing
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype("auto", "cuda:0") is torch.bfloat16  # Ampere and later
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype("auto", "cuda") is torch.float16  # a T4: bfloat16 only emulated
    assert autocast_dtype("float16", "cpu") is torch.float16 and autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    assert autocast_dtype("float32", "cuda") is None
    with pytest.raises(ValueError, match="dtype='half' must be one of auto, float32, bfloat16, float16"):
        TrainConfig(dtype="half")


def test_mfu_is_against_the_peak_of_the_device_in_use(monkeypatch, tmp_path):
    """The specific H100 variants before the generic name; a CPU or an unknown GPU gets no MFU
    (none is made up), and neither does a float32 run (the peaks are half precision's)."""
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-40GB", 312.0),
                         ("Tesla T4", 65.0), ("NVIDIA GeForce RTX 3050", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops("cuda:0") == (tflops * 1e12 if tflops else None), name
    assert peak_flops("cpu") is None
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=32))
    data = np.arange(200) % 32
    write_shard(tmp_path / "s.bin", data)
    loader = ShardLoader([tmp_path / "s.bin"], 2, 8)
    plain = Trainer(model, TrainConfig(max_steps=1), loader)
    assert "mfu" not in plain.train_step() and "MFU: none (float32 matmuls" in plain.mfu_note()
    half = Trainer(model, TrainConfig(max_steps=1, dtype="bfloat16", peak_flops=1e12), loader)
    forced = half.train_step()
    assert forced["mfu"] == pytest.approx(model.flops_per_token() * forced["tokens_per_s"] / 1e12)
    # llm.c's count: every parameter (the position embedding too), and the causal half of attention.
    c = model.config
    llmc = 6 * sum(p.numel() for p in model.parameters()) + 6 * c.n_layer * c.n_embd * c.block_size
    assert forced["mfu_llmc"] == pytest.approx(llmc * forced["tokens_per_s"] / 1e12)
    assert f"{model.flops_per_token():,} FLOPs/token" in half.mfu_note() and f"{llmc:,} FLOPs/token" in half.mfu_note()
    gpt2 = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304))
    assert gpt2.flops_per_token_llmc() / gpt2.flops_per_token() == pytest.approx(0.94, abs=0.01)


def test_float16_skips_a_step_whose_gradients_overflow_and_lowers_the_scale(tmp_path):
    cfg = TrainConfig(max_steps=3, warmup_steps=0, eval_interval=0, dtype="float16")
    trainer = Trainer(_model(), cfg, ShardLoader([_shard(tmp_path)], 4, 16))
    assert trainer.amp_dtype is torch.float16 and trainer.scaler.is_enabled()
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 126)  # float16 gradients overflow at once
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    record = trainer.train_step()  # no TrainingDiverged: the loss is finite, only the scaled gradients are not
    assert math.isfinite(record["loss"]) and not math.isfinite(record["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))  # the step was skipped
    assert trainer.scaler.get_scale() == 2.0 ** 125


def test_a_run_stopped_early_continues_bitwise_and_keeps_the_snapshot_asked_for(tmp_path):
    """fit(stop_at=k) then fit() is the straight run, and keep_steps leaves step k's weights beside the last."""
    shard = _shard(tmp_path)
    cfg = TrainConfig(max_steps=12, warmup_steps=2, log_interval=1, eval_interval=0, checkpoint_interval=0)

    def trainer(out):
        torch.manual_seed(0)
        return Trainer(_model(), cfg, ShardLoader([shard], 4, 16), out_dir=out)

    straight = trainer(tmp_path / "a")
    straight.fit(progress=False)
    first = trainer(tmp_path / "b")
    first.fit(progress=False, stop_at=5, keep_steps=(5,))
    assert first.step == 5
    at_5 = [p.detach().clone() for p in first.raw_model.parameters()]
    later = trainer(tmp_path / "b")
    assert later.resume() and later.step == 5
    later.fit(progress=False, keep_steps=(5,))
    assert [r["loss"] for r in later.history] == [r["loss"] for r in straight.history]
    assert later.history[-1]["train_seconds"] > later.history[4]["train_seconds"] > 0
    snapshot, state = load_checkpoint(kept_checkpoint_path(tmp_path / "b", 5))
    assert state["step"] == 5
    assert all(torch.equal(a, b) for a, b in zip(snapshot.parameters(), at_5, strict=True))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")[1]["step"] == 12


def test_the_clock_and_the_metrics_survive_a_stop_and_a_kill(tmp_path):
    """The clock goes on from the checkpoint's step, logged or not; a run killed before its first
    checkpoint starts over with no metrics of the lost steps left behind."""
    shard = _shard(tmp_path)
    cfg = TrainConfig(max_steps=12, warmup_steps=2, log_interval=10, eval_interval=0, checkpoint_interval=0)
    straight = Trainer(_model(), cfg, ShardLoader([shard], 4, 16)).fit(progress=False)
    first = Trainer(_model(), cfg, ShardLoader([shard], 4, 16), out_dir=tmp_path / "a")
    first.fit(progress=False, stop_at=5)  # step 5 is not a logged step
    later = Trainer(_model(), cfg, ShardLoader([shard], 4, 16), out_dir=tmp_path / "a")
    assert later.resume() and later.fit(progress=False)[-1]["tokens"] == straight[-1]["tokens"] == 12 * 4 * 16
    killed = Trainer(_model(), cfg, ShardLoader([shard], 4, 16), out_dir=tmp_path / "b")
    killed.fit(progress=False)
    killed.checkpoint_path.unlink()  # as if killed before its checkpoint was written
    again = Trainer(_model(), cfg, ShardLoader([shard], 4, 16), out_dir=tmp_path / "b")
    assert not again.resume()
    again.fit(progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [10, 12]
    # A long evaluation at the step a run stops at: the wall clock it resumes with covers it too.
    timed = dataclasses.replace(cfg, max_steps=6, eval_interval=5, eval_steps=40)
    stop = Trainer(_model(), timed, ShardLoader([shard], 4, 16), ShardLoader([shard], 4, 16), out_dir=tmp_path / "c")
    stop.fit(progress=False, stop_at=5)
    go_on = Trainer(_model(), timed, ShardLoader([shard], 4, 16), ShardLoader([shard], 4, 16), out_dir=tmp_path / "c")
    assert go_on.resume()
    last = go_on.fit(progress=False)[-1]
    assert last["wall_seconds"] >= last["train_seconds"] + last["eval_seconds"] + last["checkpoint_seconds"]


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = _model(1)
    trainer = Trainer(model, TrainConfig(max_steps=2, warmup_steps=0), ShardLoader([_shard(tmp_path)], 2, 16))
    trainer.train_step()
    path = save_checkpoint(tmp_path / "ck.safetensors", model, trainer.optimizer, step=1)
    loaded, state = load_checkpoint(path)
    assert state == {"step": 1} == checkpoint_state(path)  # the header alone holds the state
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tying survives
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_checkpoint(truncated)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="foreign.safetensors is a safetensors file but not a minigpt"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(tmp_path / "nope.safetensors")
    damaged = tmp_path / "damaged.safetensors"  # a key of the model's config renamed in the header
    damaged.write_bytes(path.read_bytes().replace(b"n_layer", b"n_lbyer", 1))
    for load in (checkpoint_config, load_checkpoint):
        with pytest.raises(CheckpointError, match="damaged.safetensors has a damaged model config.*n_lbyer"):
            load(damaged)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, shard: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo")
    try:
        torch.manual_seed(rank)  # different inits: DDP must broadcast rank 0's weights
        model = GPT(CONFIG)
        cfg = TrainConfig(max_steps=3, warmup_steps=0, grad_accum=2)
        trainer = Trainer(model, cfg, ShardLoader([shard], 2, 16, rank, world),
                          ddp=Distributed(rank, rank, world))
        first = trainer.train_data.next_batch()[0]
        trainer.train_data.reset()
        trainer.fit(progress=False)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"params": flat, "first_batch": first}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(_shard(tmp_path)), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["params"], r1["params"])
    assert not torch.equal(r0["first_batch"], r1["first_batch"])  # each rank reads its own slice
    torch.manual_seed(0)
    assert not torch.equal(r0["params"], torch.cat([p.flatten() for p in GPT(CONFIG).parameters()]))


def test_checkpoints_get_the_mode_of_any_new_file(tmp_path):
    """safetensors alone writes 0o600; a checkpoint is shared like any other file."""
    from minigpt.checkpoint import write_safetensors

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    path = write_safetensors(tmp_path / "a.safetensors", {"a": torch.zeros(2)}, {})
    assert os.stat(path).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def _parallel_worker(rank: int, world: int, port: int, shard: str, out: str) -> None:
    """DDP, then FSDP, each stopped at step 2 with a checkpoint and resumed by a new Trainer to step
    4; then an FSDP run in which SIGTERM reaches rank 1 alone."""
    from minigpt.errors import Stopped

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo")
    ddp = Distributed(rank, rank, world)

    class TermOnRank1(ShardLoader):  # SIGTERM reaches rank 1 alone, in the middle of step 2
        def next_batch(self):
            self.served = getattr(self, "served", 0) + 1
            if self.rank == 1 and self.served == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().next_batch()

    def trainer(parallel, folder, loader=ShardLoader):
        torch.manual_seed(0)
        cfg = TrainConfig(max_steps=4, warmup_steps=0, grad_accum=2, learning_rate=1e-2, parallel=parallel,
                          eval_interval=0, log_interval=1, checkpoint_interval=0)
        return Trainer(GPT(CONFIG), cfg, loader([shard], 2, 16, rank, world), ddp=ddp, out_dir=f"{out}/{folder}")

    try:
        losses = {}
        for parallel in ("ddp", "fsdp"):
            trainer(parallel, parallel).fit(progress=False, stop_at=2)
            again = trainer(parallel, parallel)
            assert again.resume() and again.step == 2
            losses[parallel] = [r["loss"] for r in again.fit(progress=False)]
        told = trainer("fsdp", "stopped", TermOnRank1)
        try:
            told.fit(progress=False)
        except Stopped:
            losses["stopped_at"] = told.step
        torch.save(losses, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_trains_as_ddp_does_and_their_checkpoints_are_one_format(tmp_path):
    """Two gloo processes: FSDP's losses are DDP's (up to the order of floating-point sums), a run
    stopped and resumed under FSDP continues its curve, its checkpoint holds the same full weights
    as DDP's and loads into a plain model; a stop asked of one process stops both after one step."""
    mp.spawn(_parallel_worker, args=(2, _free_port(), str(_shard(tmp_path)), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0 == r1  # the same mean losses on both ranks, and the same step to stop at
    assert len(r0["fsdp"]) == 4 and r0["fsdp"][-1] < r0["fsdp"][0]
    torch.testing.assert_close(r0["fsdp"], r0["ddp"], rtol=1e-5, atol=0)
    assert r0["stopped_at"] == 2  # rank 1 was told during step 2: both finished it, saved and stopped
    assert checkpoint_state(tmp_path / "stopped" / "checkpoint.safetensors")["step"] == 2
    fsdp, _ = load_checkpoint(tmp_path / "fsdp" / "checkpoint.safetensors")
    ddp, _ = load_checkpoint(tmp_path / "ddp" / "checkpoint.safetensors")
    for (name, a), b in zip(fsdp.state_dict().items(), ddp.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(fsdp.transformer.wte.weight, _model(0).transformer.wte.weight)  # it trained


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_on_the_curve(tmp_path):
    from minigpt.errors import Stopped

    class TermAtBatch(ShardLoader):  # SIGTERM arrives in the middle of step 3 (its first micro-batch)
        def next_batch(self):
            self.served = getattr(self, "served", 0) + 1
            if self.served == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().next_batch()

    cfg = TrainConfig(max_steps=6, warmup_steps=0, grad_accum=2, eval_interval=0, log_interval=1,
                      checkpoint_interval=0)
    straight = Trainer(_model(0), cfg, ShardLoader([_shard(tmp_path)], 2, 16)).fit(progress=False)
    before = signal.getsignal(signal.SIGTERM)
    stopped = Trainer(_model(0), cfg, TermAtBatch([_shard(tmp_path)], 2, 16), out_dir=tmp_path / "run")
    with pytest.raises(Stopped, match="after step 3.*checkpoint.safetensors holds it.*same command again"):
        stopped.fit(progress=False)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    assert checkpoint_state(stopped.checkpoint_path)["step"] == 3
    resumed = Trainer(_model(1), cfg, ShardLoader([_shard(tmp_path)], 2, 16), out_dir=tmp_path / "run")
    assert resumed.resume() and resumed.step == 3
    assert [r["loss"] for r in resumed.fit(progress=False)] == [r["loss"] for r in straight]
    stopped.train_data.served = 99  # no second signal: the stop asked of the first fit is spent
    assert [r["loss"] for r in stopped.fit(progress=False)] == [r["loss"] for r in straight]  # in the same process

    def evals(model):  # SIGTERM during the last step's evaluation: the run ends, and so must the process
        if late.step == cfg.max_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}
    late = Trainer(_model(0), dataclasses.replace(cfg, eval_interval=3), ShardLoader([_shard(tmp_path)], 2, 16),
                   ShardLoader([_shard(tmp_path)], 2, 16), out_dir=tmp_path / "late", evals=evals)
    with pytest.raises(Stopped, match="arrived as the run reached step 6 .*holds it.*same command again"):
        late.fit(progress=False)
    assert checkpoint_state(late.checkpoint_path)["step"] == 6


def test_the_clock_counts_evaluation_and_checkpoints_and_the_budget_skips_costly_saves(tmp_path, monkeypatch):
    cfg = TrainConfig(max_steps=8, warmup_steps=0, eval_interval=2, eval_steps=2, log_interval=1, checkpoint_interval=2)
    run = Trainer(_model(0), cfg, ShardLoader([_shard(tmp_path)], 2, 16), ShardLoader([_shard(tmp_path, seed=1)], 2, 16),
                  out_dir=tmp_path / "a")
    last = run.fit(progress=False)[-1]
    assert last["tokens"] == 8 * 2 * 16
    assert last["wall_seconds"] > last["train_seconds"] + last["eval_seconds"] + last["checkpoint_seconds"] * 0.99
    assert last["eval_seconds"] > 0 and last["checkpoint_seconds"] > 0
    assert last["wall_tokens_per_s"] == pytest.approx(last["tokens"] / last["wall_seconds"])
    saves = []
    slow = Trainer(_model(0), TrainConfig(**{**cfg.__dict__, "checkpoint_budget": 0.01}),
                   ShardLoader([_shard(tmp_path)], 2, 16), out_dir=tmp_path / "b")
    real_save = slow.save

    def save(path=None):  # as if each save took a million seconds
        saves.append(slow.step)
        real_save(path)
        slow._last_save = (slow._last_save[0], 1e6)
    monkeypatch.setattr(slow, "save", save)
    slow.fit(progress=False)
    assert saves == [2, 8]  # the first, then only the end's: every other would have cost more than 1%
    with pytest.raises(ValueError, match="checkpoint_budget"):
        TrainConfig(checkpoint_budget=1.0)
    with pytest.raises(ValueError, match="parallel='zero'"):
        TrainConfig(parallel="zero")
    for bad in (dict(log_interval=0), dict(eval_steps=0)):
        with pytest.raises(ValueError, match="must be at least 1 .eval_interval=0 turns evaluation off"):
            TrainConfig(**bad)
