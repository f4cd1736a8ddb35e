"""The one training loop of the book: pretraining, SFT and the rest all run through :class:`Trainer`.

It does what a GPT-2 scale run needs and nothing more: AdamW (fused), linear warmup
then cosine decay, gradient accumulation, gradient clipping, mixed precision (bf16 where the GPU
has it, fp16 with a gradient scaler where it does not, see :func:`autocast_dtype`), optional
``torch.compile``, DDP under ``torchrun``, evaluation in nats and bits per byte, JSONL metrics,
and checkpoints from which a killed run resumes onto the very same loss curve.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from minigpt.checkpoint import (
    checkpoint_state,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from minigpt.errors import MinigptError, Stopped
from minigpt.model import GPT

if TYPE_CHECKING:
    from minigpt.recipe import Recipe

#: Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from the vendors' datasheets, by a
#: name that occurs in ``torch.cuda.get_device_name()``; the specific variants come first.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
               "L4": 121.0, "T4": 65.0, "V100": 125.0}

#: ``TrainConfig.dtype``'s choices: "auto" picks by device (:func:`autocast_dtype`); the others force one.
DTYPES = ("auto", "float32", "bfloat16", "float16")

#: ``TrainConfig.parallel``'s choices, for more than one process: every process holds the whole model
#: (DDP), or each holds a shard of it (FSDP2, :mod:`minigpt.fsdp`).
PARALLEL = ("ddp", "fsdp")


#: A batch's inputs: token ids, or a tuple of tensors the model reads before the targets (a
#: captioner's images, then its token ids), so a model with more than text to read trains here too.
Inputs = torch.Tensor | tuple[torch.Tensor, ...]


class BatchSource(Protocol):
    """What the trainer needs from a data loader (see :class:`minigpt.shards.ShardLoader`)."""

    def next_batch(self) -> tuple[Inputs, torch.Tensor]: ...
    def reset(self) -> None: ...
    def state_dict(self) -> dict[str, int]: ...
    def load_state_dict(self, state: dict[str, int]) -> None: ...


class SeededBatches:
    """A :class:`BatchSource` that draws batch ``i`` as ``self.sample(self.batch_size, generator)``
    with a generator seeded from ``(seed, i)``: its whole position is ``i``, so a resumed run draws
    the very same batches. A subclass sets ``seed``, ``batch_size`` and ``index = 0`` and defines
    ``sample`` (a synthetic task such as :class:`minigpt.tasks.copying.CopyTask`)."""

    seed: int
    batch_size: int
    index: int

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        self.index += 1
        return self.sample(self.batch_size, generator)

    def reset(self) -> None:
        self.index = 0

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"the saved data position is for seed={state['seed']}, but this source has "
                             f"seed={self.seed}")
        self.index = state["index"]


@dataclass
class TrainConfig:
    """Every optimisation setting; the CLI exposes each one as ``--name value``."""

    max_steps: int = 1000
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_interval: int = 250
    eval_steps: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 500  # 0: only at the end (and when SIGTERM stops the run)
    # > 0: skip a scheduled checkpoint while the last one took more than this share of the time
    # since it (0.01: saving costs at most 1% of the run, whatever the disk and model size).
    checkpoint_budget: float = 0.0
    sample_interval: int = 0  # 0: never
    dtype: str = "float32"  # one of DTYPES: the autocast dtype, "auto" to pick it by device
    compile: bool = False
    # The output head only where a target counts (a GPT's forward(logits=False)): SFT learns from a
    # few answer tokens per row, and the head (a V x C matmul, a softmax over V) at the others is
    # wasted (about 8% of a cpu SFT step, measured). Data-dependent shapes: not under compile.
    head_at_targets_only: bool = False
    seed: int = 1337
    peak_flops: float | None = None  # FLOP/s for MFU; None: the device's own (:func:`peak_flops`)
    parallel: str = "ddp"  # one of PARALLEL: how more than one process splits the work

    @classmethod
    def from_recipe(cls, recipe: Recipe, **fields: Any) -> TrainConfig:
        """A stage's settings (``fields``) with what every stage of ``recipe`` shares: its
        optimiser (:class:`~minigpt.recipe.OptimRecipe`), dtype, compile, seed and parallelism."""
        shared = dict(**dataclasses.asdict(recipe.optim), dtype=recipe.dtype, compile=recipe.compile, seed=recipe.seed,
                      parallel=recipe.parallel)
        return cls(**{**shared, **fields})

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.grad_accum < 1:
            raise ValueError("max_steps and grad_accum must be at least 1")
        if self.log_interval < 1 or self.eval_steps < 1:
            raise ValueError(f"log_interval={self.log_interval} and eval_steps={self.eval_steps} must be at least 1 "
                             "(eval_interval=0 turns evaluation off)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel={self.parallel!r} must be one of {', '.join(PARALLEL)}")
        if not 0 <= self.checkpoint_budget < 1:
            raise ValueError(f"checkpoint_budget={self.checkpoint_budget} is a share of the run's time: "
                             "0 (off) up to, not including, 1")
        if self.head_at_targets_only and self.compile:
            raise ValueError("head_at_targets_only selects positions by their targets (a data-dependent shape), "
                             "which torch.compile cannot trace as one graph; turn one of them off")


class TrainingDiverged(MinigptError):
    """The loss or the gradient norm is no longer a finite number: no later step can undo it, so the
    run stops there, before a checkpoint could keep the damage."""


class DamagedMetrics(MinigptError):
    """A line of ``metrics.jsonl`` other than the last is not a JSON record."""


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A run killed while logging leaves half a last line, which
    is expected: it is dropped with a note. A damaged line before it is an error naming the line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                print(f"note: dropping the half-written last line of {path} (its run was stopped while logging)")
                break
            raise DamagedMetrics(f"{path}, line {number}, is not a JSON record ({err}); delete that line, or the "
                                 "file (the run resumes without it, but its earlier metrics are lost)") from None
    return records


def autocast_dtype(dtype: str, device: str) -> torch.dtype | None:
    """The dtype that matmuls run in on ``device`` for the setting ``dtype``, None for float32.

    "auto" takes bfloat16 where the GPU computes it natively (Ampere, compute capability 8.0,
    and later: A100, H100, RTX 30xx+), float16 on older GPUs such as Colab's free T4 (7.5),
    whose recent torch would emulate bfloat16 slowly or not compile it, and float32 on a CPU,
    where half precision saves no time. Forcing "float16" or "bfloat16" autocasts on any device,
    the CPU included, so each path can be tested without a GPU. Weights and optimizer state stay
    float32 throughout: autocast only lowers the precision of the matmuls' inputs.
    """
    if dtype == "auto":
        if not device.startswith("cuda"):
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def peak_flops(device: str) -> float | None:
    """``device``'s dense half-precision peak in FLOP/s (:data:`PEAK_TFLOPS`), None for a CPU or
    a GPU not in the table: MFU against another device's peak would mislead (an A100 measured
    against an H100's peak reads 3.2 times too low)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``learning_rate``, then cosine decay to ``learning_rate * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    min_lr = cfg.learning_rate * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only: not on biases or LayerNorm gains,
    nor on what a module lists in a ``no_decay_parameters()`` method (LoRA's adapters)."""
    exempt = {id(p) for m in model.modules() if hasattr(m, "no_decay_parameters") for p in m.no_decay_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p.dim() >= 2 and id(p) not in exempt for p in params]
    groups = [
        {"params": [p for p, d in zip(params, decay) if d], "weight_decay": cfg.weight_decay},
        {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0},
    ]
    # Fused: one kernel over every tensor instead of a loop of small ops per parameter, on CUDA and
    # on the CPU alike (on a cpu SFT step the per-parameter loop took about 14 ms of 100).
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type in ("cuda", "cpu"))


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Distributed, str]:
    """Join the process group that ``torchrun`` describes in the environment; return the device.

    NCCL on CUDA (one GPU per process), gloo on CPU, so the same code is tested on a laptop.
    """
    if "RANK" not in os.environ:
        return Distributed(), device
    ddp = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device.startswith("cuda"):
        torch.cuda.set_device(ddp.local_rank)
        device = f"cuda:{ddp.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return ddp, device


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``model`` on batches from ``train``."""

    def __init__(self, model: GPT, cfg: TrainConfig, train: BatchSource, val: BatchSource | None = None,
                 *, device: str = "cpu", out_dir: str | os.PathLike | None = None,
                 ddp: Distributed = Distributed(), bytes_per_token: float | None = None,
                 sample: Callable[[GPT], str] | None = None,
                 penalty: Callable[[torch.nn.Module], torch.Tensor] | None = None,
                 evals: Callable[[GPT], dict[str, float]] | None = None) -> None:
        self.cfg, self.train_data, self.val_data = cfg, train, val
        #: A term added to every step's loss, of the weights alone (EWC's pull towards an old
        #: task's weights, :mod:`minigpt.continual`); logged as ``penalty``, apart from ``loss``.
        self.penalty = penalty
        #: More figures at each evaluation, of the model (a benchmark such as HellaSwag); called on
        #: every process, and merged into the record.
        self.evals = evals
        self.device, self.ddp = device, ddp
        self.device_type = "cuda" if device.startswith("cuda") else "cpu"
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.bytes_per_token, self.sample = bytes_per_token, sample
        self.raw_model = model.to(device)
        if self.device_type == "cuda":  # float32 matmuls (the loss, a float32 run) on TF32 tensor cores
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.sharded = ddp.world_size > 1 and cfg.parallel == "fsdp"
        if self.sharded:  # before the optimizer: sharding turns the parameters into distributed tensors
            from minigpt.fsdp import shard_model

            shard_model(self.raw_model)
        self.optimizer = make_optimizer(self.raw_model, cfg, self.device_type)
        self.amp_dtype = autocast_dtype(cfg.dtype, device)
        # MFU compares with a half-precision peak, so only where the matmuls run in half precision.
        self.peak_flops = (cfg.peak_flops or peak_flops(device)) if self.amp_dtype is not None else None
        # float16 keeps 5 exponent bits: small gradients would flush to zero. The scaler multiplies
        # the loss before backward and divides the gradients after; a step whose gradients overflow
        # is skipped and the scale halved (so it finds the largest safe scale by itself).
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.amp_dtype == torch.float16)
        #: The model evaluation runs: compiled like the training one where that is on (a second
        #: graph, for no_grad), without DDP's wrapper, which only matters for gradients.
        self.eval_model: torch.nn.Module = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        wrapped = self.eval_model
        if ddp.world_size > 1 and not self.sharded:
            wrapped = DDP(wrapped, device_ids=[ddp.local_rank] if self.device_type == "cuda" else None)
        self.model = wrapped
        self._loss_kwargs = {"logits": False} if cfg.head_at_targets_only else {}
        self.step = 0
        # Since step 0, across resumes: seconds in train_step; seconds of fit in all (training,
        # evaluation, samples and checkpoints: what the run costs); of those, evaluation's,
        # samples' and checkpoints'; and training tokens.
        self.clock = {"train_seconds": 0.0, "wall_seconds": 0.0, "eval_seconds": 0.0, "sample_seconds": 0.0,
                      "checkpoint_seconds": 0.0, "tokens": 0}
        self._last_save: tuple[float, float] = (time.perf_counter(), 0.0)  # when, and its seconds
        self._sigterm = False  # set by the SIGTERM handler fit installs; acted on after a whole step
        self.stopping = False  # every process agrees to stop (a SIGTERM reached one of them)
        #: One record per logged step (loss, lr, grad_norm, tokens_per_s and the clock above;
        #: val_loss, sample at evaluations).
        self.history: list[dict[str, Any]] = []

    # -- one step -------------------------------------------------------------------------
    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def _next_batch(self, source: BatchSource) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``source``'s next batch on the device, its inputs always a tuple: the model gets
        ``(*inputs, targets)``, and the last input (the token ids) is what counts as tokens. To a GPU
        through page-locked memory, without waiting: the copy overlaps the work queued before it."""
        x, y = source.next_batch()
        inputs = x if isinstance(x, tuple) else (x,)
        if self.device_type != "cuda":
            return tuple(t.to(self.device) for t in inputs), y.to(self.device)
        return (tuple(t.pin_memory().to(self.device, non_blocking=True) for t in inputs),
                y.pin_memory().to(self.device, non_blocking=True))

    def _gradient_sync(self, on: bool) -> Any:
        """Whether this backward's gradients are averaged across processes now: only the last
        micro-batch's need be (DDP all-reduces, FSDP reduce-scatters, on every backward otherwise)."""
        if self.ddp.world_size == 1 or on:
            if self.sharded:
                self.raw_model.set_requires_gradient_sync(True)
            return nullcontext()
        if self.sharded:
            self.raw_model.set_requires_gradient_sync(False)
            return nullcontext()
        return self.model.no_sync()

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        cfg, start = self.cfg, time.perf_counter()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        record_penalty: torch.Tensor | None = None
        for micro in range(cfg.grad_accum):
            inputs, y = self._next_batch(self.train_data)
            tokens += inputs[-1].numel()
            with self._gradient_sync(micro == cfg.grad_accum - 1), self._autocast():
                _, loss = self.model(*inputs, y, **self._loss_kwargs)
            objective = loss
            if self.penalty is not None:  # a share per micro-batch: once per step in all
                penalty = self.penalty(self.raw_model)
                objective = loss + penalty
                record_penalty = penalty.detach()
            self.scaler.scale(objective / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        # The norm is measured even with clipping off (an infinite bound): it shows a blow-up as it happens.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # sharded: a distributed tensor holding partial sums
            grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)  # skipped where the scaled gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        loss_mean = loss_sum / cfg.grad_accum
        if self.ddp.world_size > 1:
            # One collective for the mean loss and for whether any process was told to stop, so
            # that all of them stop after the same step.
            shared = torch.stack([loss_mean, torch.tensor(float(self._sigterm), device=self.device)])
            dist.all_reduce(shared, op=dist.ReduceOp.AVG)
            loss_mean, stop = shared[0], shared[1]
            self.stopping = stop.item() > 0
        else:
            self.stopping = self._sigterm
        loss_value = loss_mean.item()  # waits for the GPU, so the timing below is honest
        norm_value = grad_norm.item()  # no second wait: the GPU is done
        # Free: both are on the host anyway. With the scaler, an overflowing gradient is its business
        # (it skipped the step); a loss that is not finite is divergence either way.
        if not math.isfinite(loss_value) or not (math.isfinite(norm_value) or self.scaler.is_enabled()):
            raise TrainingDiverged(self._diverged(loss_value, norm_value, lr))
        self.step += 1
        seconds = time.perf_counter() - start
        self.clock["train_seconds"] += seconds
        self.clock["tokens"] += tokens * self.ddp.world_size
        tokens_per_s = tokens * self.ddp.world_size / seconds
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                  "tokens_per_s": tokens_per_s, "train_seconds": self.clock["train_seconds"]}
        if self.peak_flops:  # this process's share of the FLOP/s, against its own device's peak
            per_device = tokens_per_s / self.ddp.world_size / self.peak_flops
            record["mfu"] = self.raw_model.flops_per_token() * per_device
            record["mfu_llmc"] = self.raw_model.flops_per_token_llmc() * per_device
        if record_penalty is not None:
            record["penalty"] = record_penalty.item()
        return record

    def mfu_note(self) -> str:
        """How this run's ``mfu`` is computed, or why it has none: a line for the log."""
        m = self.raw_model
        if not self.peak_flops:
            why = "float32 matmuls" if self.amp_dtype is None else f"no known peak for {self.device}"
            return f"MFU: none ({why}; minigpt.train.PEAK_TFLOPS lists the GPUs it knows); tokens/s only"
        return (f"MFU = tokens/s per device x {m.flops_per_token():,} FLOPs/token (6N + 12LHQT, N without the "
                f"position embedding: nanoGPT, PaLM) / {self.peak_flops / 1e12:g} TFLOP/s (dense half-precision peak "
                f"of {torch.cuda.get_device_name(self.device) if self.device_type == 'cuda' else self.device}); "
                f"mfu_llmc counts as llm.c does: {m.flops_per_token_llmc():,} FLOPs/token (6N + 6LCT, N every parameter)")

    def _diverged(self, loss: float, grad_norm: float, lr: float) -> str:
        """What went wrong at the step being taken, its likely causes, and what was kept."""
        cfg = self.cfg
        kept = "nothing was saved"
        if self.out_dir is not None and self.checkpoint_path.exists():
            kept = f"{self.checkpoint_path} is untouched (step {checkpoint_state(self.checkpoint_path)['step']})"
        return (f"training diverged at step {self.step + 1}: loss {loss:.4g}, gradient norm {grad_norm:.4g}; likely "
                f"causes: a learning rate too high ({lr:.3g} at this step), gradient clipping off or too loose "
                f"(grad_clip={cfg.grad_clip}), or a numeric overflow (dtype={cfg.dtype}); {kept}. Lower the "
                "learning rate or clip gradients, and start the run over (--restart)")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss over ``eval_steps`` batches, the same batches every time, and
        :attr:`evals`' figures. The processes share the batches out (each reads ``eval_steps /
        processes`` of them), so the figure does not depend on how many there are."""
        if self.val_data is None:
            return {}
        self.model.eval()
        self.val_data.reset()
        total = torch.zeros((), device=self.device)
        steps = math.ceil(self.cfg.eval_steps / self.ddp.world_size)
        for _ in range(steps):
            inputs, y = self._next_batch(self.val_data)
            with self._autocast():
                _, loss = self.eval_model(*inputs, y, **self._loss_kwargs)
            total += loss
        val_loss = total / steps
        if self.ddp.world_size > 1:
            dist.all_reduce(val_loss, op=dist.ReduceOp.AVG)
        result = {"val_loss": val_loss.item()}
        if self.bytes_per_token:
            # nats per token / bytes per token = nats per byte; / ln 2 = bits per byte
            result["val_nats_per_byte"] = result["val_loss"] / self.bytes_per_token
            result["val_bpb"] = result["val_nats_per_byte"] / math.log(2)
        if self.evals is not None:
            with self._autocast():
                result.update(self.evals(self.raw_model))
        return result

    # -- the loop --------------------------------------------------------------------------
    def fit(self, progress: bool = True, *, stop_at: int | None = None,
            keep_steps: Collection[int] = ()) -> list[dict[str, Any]]:
        """Train until ``max_steps``, logging, evaluating, sampling and checkpointing on the way.

        ``stop_at`` ends this call early, at that step of the same schedule, with a checkpoint: a
        later ``fit`` resumes onto the very curve of a run that never stopped. At each of
        ``keep_steps`` a copy of the checkpoint stays (:func:`kept_checkpoint_path`): a snapshot
        of the run for another run to start from. SIGTERM ends the run after the step under way,
        with a checkpoint, by raising :class:`~minigpt.errors.Stopped`.
        """
        cfg = self.cfg
        end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
        bar = tqdm(total=end, initial=self.step, disable=not (progress and self.ddp.is_main),
                   desc="training", unit="step")
        with self._sigterm_stops():
            while self.step < end:
                started = time.perf_counter()
                record = self.train_step()
                done = self.step == cfg.max_steps
                if cfg.eval_interval and (self.step % cfg.eval_interval == 0 or done):
                    record.update(self._timed("eval_seconds", self.evaluate))
                if self.sample and cfg.sample_interval and self.step % cfg.sample_interval == 0:
                    text = self._timed("sample_seconds", self._sample)
                    if text is not None:
                        record["sample"] = text
                # The wall clock up to here goes into the checkpoint with the parts it covers (a save's
                # own seconds are counted after it, in both). The kept copy first: a run killed between
                # the two saves resumes from before this step and writes both again.
                self.clock["wall_seconds"] += time.perf_counter() - started
                saving = time.perf_counter()
                if self.out_dir is not None and self.step in keep_steps:
                    self._timed("checkpoint_seconds", self.save, kept_checkpoint_path(self.out_dir, self.step))
                if self.out_dir is not None and self._save_due(end):
                    self._timed("checkpoint_seconds", self.save)
                self.clock["wall_seconds"] += time.perf_counter() - saving
                if self.step % cfg.log_interval == 0 or done or "val_loss" in record or self.stopping:
                    record.update(self.clock, wall_tokens_per_s=self.clock["tokens"] / self.clock["wall_seconds"])
                    self._log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", **(
                        {"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
                bar.update(1)
                if self.stopping:
                    bar.close()
                    where = f"; {self.checkpoint_path} holds it" if self.out_dir is not None else " (no out_dir to save in)"
                    raise Stopped(f"SIGTERM stopped the run after step {self.step}{where}: run the same command "
                                  "again to resume")
            if self._sigterm:  # it came during the last step's evaluation or checkpoint: the step is done
                bar.close()
                where = f" ({self.checkpoint_path} holds it)" if self.out_dir is not None else ""
                raise Stopped(f"SIGTERM arrived as the run reached step {self.step}{where}: run the same command "
                              "again to go on with what comes after it")
        bar.close()
        return self.history

    def _timed(self, clock: str, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)``, its seconds added to ``self.clock[clock]``."""
        start = time.perf_counter()
        result = work(*args)
        self.clock[clock] += time.perf_counter() - start
        return result

    def _sample(self) -> str | None:
        """The sample callback's text on the main process (every process runs it when the model is
        sharded: each forward gathers the weights from all of them)."""
        if self.sharded or self.ddp.is_main:
            text = self.sample(self.raw_model)
            return text if self.ddp.is_main else None
        return None

    def _save_due(self, end: int) -> bool:
        """A checkpoint now: at the end of this call, when stopping, or on the schedule, unless the
        last save took more than ``checkpoint_budget`` of the time since it."""
        if self.step == end or self.stopping:
            return True
        if not (self.cfg.checkpoint_interval and self.step % self.cfg.checkpoint_interval == 0):
            return False
        if not self.cfg.checkpoint_budget:
            return True
        when, seconds = self._last_save
        return seconds <= self.cfg.checkpoint_budget * (time.perf_counter() - when)

    @contextmanager
    def _sigterm_stops(self) -> Iterator[None]:
        """While training, SIGTERM asks for a stop after the step under way rather than killing the
        process mid-write; the handler before is put back after. (Only the main thread may set one.)"""
        self._sigterm = False  # a stop asked of an earlier fit is spent: this one trains on
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask(signum: int, frame: Any) -> None:
            self._sigterm = True

        before = signal.signal(signal.SIGTERM, ask)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, before)

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.out_dir is not None and self.ddp.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- checkpoints -----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        if self.out_dir is None:
            raise ValueError("this trainer has no out_dir to keep checkpoints in")
        return self.out_dir / "checkpoint.safetensors"

    def save(self, path: Path | None = None) -> None:
        """Checkpoint to ``path`` (default :attr:`checkpoint_path`; rank 0 writes, all ranks
        share one data position; a sharded model is gathered first, by every rank)."""
        start = time.perf_counter()
        full = None
        if self.sharded:
            from minigpt.fsdp import full_state

            full = full_state(self.raw_model, self.optimizer)
        if self.ddp.is_main:
            save_checkpoint(path or self.checkpoint_path, self.raw_model, self.optimizer, full_state=full,
                            step=self.step, train_config=dataclasses.asdict(self.cfg),
                            train_data=self.train_data.state_dict(), grad_scaler=self.scaler.state_dict(),
                            clock=dict(self.clock))
        if self.ddp.world_size > 1:
            dist.barrier()
        self._last_save = (time.perf_counter(), time.perf_counter() - start)

    def resume(self) -> bool:
        """Continue from ``out_dir``'s checkpoint if there is one; True if it resumed."""
        path = self.checkpoint_path
        metrics = self.out_dir / "metrics.jsonl"
        if not path.exists():  # killed before its first checkpoint: it starts over, and so do its metrics
            if self.ddp.is_main:
                metrics.unlink(missing_ok=True)
            return False
        if self.sharded:
            from minigpt.fsdp import load_full_state

            contents = read_checkpoint(path)
            load_full_state(self.raw_model, self.optimizer, contents.weights, contents.resumable_optimizer())
            contents.restore_rng()
            state = contents.state
        else:
            _, state = load_checkpoint(path, self.raw_model, self.optimizer, restore_rng=True)
        self.step = state["step"]
        self.train_data.load_state_dict(state["train_data"])
        if state.get("grad_scaler"):  # empty when the scaler is off
            self.scaler.load_state_dict(state["grad_scaler"])
        if "clock" in state:  # the step of a checkpoint need not be a step that was logged (stop_at)
            self.clock.update(state["clock"])
        if metrics.exists():  # drop lines a killed run wrote after the checkpoint
            self.history = [r for r in read_metrics(metrics) if r["step"] <= self.step]
            last = self.history[-1] if self.history else {}
            if "clock" not in state:  # a checkpoint written before the clock was saved in it
                self.clock.update({k: last[k] for k in self.clock if k in last})
            if self.ddp.is_main:
                tmp = metrics.with_name(f"{metrics.name}.{os.getpid()}.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
                os.replace(tmp, metrics)
        return True


def kept_checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """Where :meth:`Trainer.fit` keeps the checkpoint of ``step`` (``keep_steps``) in ``out_dir``."""
    return Path(out_dir) / f"checkpoint-step{step}.safetensors"


def plot_history(history: list[dict[str, Any]], ax: Any = None) -> Any:
    """Plot training loss and validation loss against step from :attr:`Trainer.history` records
    (or ``metrics.jsonl`` lines); returns the matplotlib axes. matplotlib is imported only here."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
