"""Trained models as runs: one folder per stage, described by its ``run.json``.

A run folder holds a model's checkpoint, its tokenizer (``tokenizer.bpe``), ``metrics.jsonl``
and ``run.json``: the stage that made it, the part of the recipe it used, the run it started
from, a digest of the package code it ran, and when it finished. Every reader goes through
:func:`load_run`, whatever the stage: chat, the RL stages and the notebooks alike.

:func:`find_or_make` is how a chapter gets the model of an earlier one: it reuses the cached run
only when the recipe part, the parent run and the code all match, and otherwise trains it again
and says why. A change to ``minigpt/sft.py`` thus retrains SFT and what starts from it, and
leaves the pretraining alone (its code does not import ``sft.py``).

While a stage trains into a folder it holds the folder's lock (:func:`run_lock`): a second run
there would write the same checkpoint and metrics, so it is refused and told who holds the lock.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from minigpt.checkpoint import checkpoint_config, load_checkpoint
from minigpt.data import cache_dir
from minigpt.errors import MinigptError
from minigpt.lora import apply_lora
from minigpt.model import GPT, GPTConfig
from minigpt.peft import apply_peft
from minigpt.recipe import Recipe, flatten
from minigpt.tokenizer import BPETokenizer
from minigpt.train import kept_checkpoint_path, read_metrics

__all__ = ["LOCK_FILE", "RUN_FILE", "RUN_FILES", "STAGES", "Run", "RunInfo", "RunLocked", "begin_run", "code_digest",
           "find_or_make", "finish_run", "imported_modules", "load_run", "module_closure", "open_run", "read_history",
           "read_run", "run_dir", "run_info", "run_lock", "trained", "write_run"]

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
FORMAT = "minigpt-run 1"

#: What each cached stage reads: its module (whose imports make up its code), the recipe parts
#: that shape it, and the stage it starts from.
STAGES: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "pretrain": ("minigpt.pretrain", ("tokenizer", "model", "optim", "pretrain"), None),
    "sft": ("minigpt.sft", ("tokenizer", "model", "optim", "sft"), "pretrain"),
    "chat": ("minigpt.chatbot", ("tokenizer", "model", "optim", "chat"), "pretrain"),
    "instruct": ("minigpt.chatbot", ("optim", "instruct"), None),  # from GPT-2's weights on the Hub
}

# Not part of a stage's code: the settings (compared by value instead) and the entry points.
_NOT_CODE = {"minigpt", "minigpt.recipe", "minigpt.runs", "minigpt.cli", "minigpt.__main__"}


def _module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"no module {name}")
    return Path(spec.origin)


def imported_modules(source: str) -> set[str]:
    """The ``minigpt`` modules that Python ``source`` imports, at the top or inside functions
    (not those imported only for type checking)."""
    tree = ast.parse(source)
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minigpt"):
            found.add(node.module)
            if _is_package(node.module):  # `from minigpt.rlhf import run` imports a module
                found.update(f"{node.module}.{a.name}" for a in node.names
                             if importlib.util.find_spec(f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("minigpt"))
    return found


def _is_package(name: str) -> bool:
    return _module_file(name).name == "__init__.py"


def module_closure(modules: set[str]) -> set[str]:
    """``modules`` and every ``minigpt`` module they import, directly or not; the settings and
    the entry points are listed but not followed (the recipe imports the RL configs, which a
    pretraining run does not depend on)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            if name not in _NOT_CODE:
                todo.extend(imported_modules(_module_file(name).read_text()) - seen)
    return seen


def code_digest(*modules: str) -> tuple[str, list[str]]:
    """A digest of the code of ``modules`` and of every ``minigpt`` module they import, directly
    or not (the settings and entry points left out); and those modules' names."""
    names = sorted(module_closure(set(modules)) - _NOT_CODE)
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + _code_of(_module_file(name)) + b"\0")
    return h.hexdigest()[:16], names


def _code_of(path: Path) -> bytes:
    """A module's code without its comments, docstrings and layout (its syntax tree): mending a
    docstring or reflowing a line retrains nothing; changing what the code does retrains."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


@dataclass(frozen=True)
class RunInfo:
    """What ``run.json`` says of a run."""

    stage: str  # "pretrain", "sft", "lora", "chat", "instruct", "reward", "ppo", "dpo" or "grpo"
    profile: str  # the recipe's name
    settings: dict[str, Any]  # the recipe part the stage used, by dotted path
    parent: str | None  # the key of the run it started from
    code: str  # digest of the package code it ran (code_digest)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # what a loader needs (LoRA's arguments)
    finished: str | None = None  # when it finished (UTC, ISO 8601); None while it trains

    @property
    def key(self) -> str:
        """Names this run's recipe part, parent and code: a run that starts from it records it."""
        blob = json.dumps([self.stage, self.settings, self.parent, self.code], sort_keys=True, default=str)
        return f"{self.stage}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def differences(self, other: RunInfo) -> list[str]:
        """Why ``other`` is not this run: another stage, or changed settings, parent or code, in words."""
        if self.stage != other.stage:  # every setting would differ too: the stage says it all
            return [f"its stage is {self.stage}, not {other.stage}"]
        why = [f"{k}: {self.settings.get(k)!r} -> {other.settings.get(k)!r}"
               for k in sorted(set(self.settings) | set(other.settings)) if self.settings.get(k) != other.settings.get(k)]
        if self.parent != other.parent:
            why.append(f"the run it starts from changed ({self.parent} -> {other.parent})")
        data = self.extra.get("data"), other.extra.get("data")  # what it learns from, where a run records it
        if None not in data and data[0] != data[1]:
            why.append(f"the data changed ({data[0]} -> {data[1]})")
        if self.code != other.code:
            why.append(f"the code changed (digest {self.code} -> {other.code})")
        return why


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def run_info(recipe: Recipe, stage: str, *, parent: str | None = None, parts: tuple[str, ...] | None = None,
             module: str | None = None, train: dict[str, Any] | None = None,
             extra: dict[str, Any] | None = None) -> RunInfo:
    """The :class:`RunInfo` that a run of ``stage`` with ``recipe`` has: its recipe ``parts`` (the
    stage's own, see :data:`STAGES`, plus the seed and dtype), any Trainer settings it was given
    beyond the recipe (``train``), its ``parent`` key and its code's digest."""
    own_module, own_parts, _ = STAGES.get(stage, (None, (), None))
    parts, module = parts or own_parts, module or own_module
    if module is None:
        raise ValueError(f"stage {stage!r} names no module; pass module=")
    settings: dict[str, Any] = {"seed": recipe.seed, "dtype": recipe.dtype}
    settings.update({path: _jsonable(v) for part in parts for path, v in flatten(getattr(recipe, part), f"{part}.")})
    settings.update({f"train.{k}": _jsonable(v) for k, v in (train or {}).items()})
    return RunInfo(stage, recipe.name, settings, parent, code_digest(module)[0], dict(extra or {}))


def write_run(folder: str | os.PathLike, info: RunInfo) -> Path:
    """Write ``run.json`` atomically (a killed writer leaves the old file or the new one; the
    temporary name carries the process id, so two writers never share it)."""
    path = Path(folder) / RUN_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **dataclasses.asdict(info), "key": info.key}, indent=1))
    os.replace(tmp, path)
    return path


def read_run(folder: str | os.PathLike) -> RunInfo:
    """The :class:`RunInfo` of a run folder, or an error that says what the folder is missing."""
    path = Path(folder) / RUN_FILE
    if not path.exists():
        inside = sorted(str(p.parent) for p in Path(folder).glob(f"*/{RUN_FILE}"))  # e.g. runs/rlhf -> runs/rlhf/grpo
        hint = f"; the runs in it: {', '.join(inside)}" if inside else ""
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a run folder (made by `minigpt pretrain`, "
                                f"`minigpt sft` or `minigpt rlhf`){hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is damaged ({err}); delete the folder and train it again") from None
    if data.pop("format", None) != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT!r} file; train the run again with this version of minigpt")
    data.pop("key", None)
    try:
        return RunInfo(**data)
    except TypeError as err:
        raise ValueError(f"{path} is damaged ({err}); delete the folder and train it again") from None


#: What a run writes into its folder: the files that starting over removes (nothing else is touched;
#: ``*.tmp`` are what a writer killed mid-write leaves).
RUN_FILES = ("run.json", "checkpoint.safetensors", "checkpoint-step*.safetensors", "metrics.jsonl", "tokenizer.bpe",
             "lora.safetensors", "reward_model.safetensors", "summary.json", "shards", "prepared.json", "*.tmp")


class RunLocked(MinigptError):
    """Another process is training into the run folder."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _holder(text: str) -> str:
    """Who a lock file names, in words."""
    try:
        who = json.loads(text)
        return f"pid {who['pid']} on {who['host']}, since {who['since']}"
    except (ValueError, KeyError, TypeError):  # written by nobody yet: its holder has just taken it
        return "a process that has not yet written its pid"


if os.name == "nt":
    import msvcrt

    def _lock_now(f: IO[str]) -> None:
        """Lock ``f`` or raise BlockingIOError at once (Windows: a lock on its first byte)."""
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
else:
    import fcntl

    def _lock_now(f: IO[str]) -> None:
        """Lock ``f`` or raise BlockingIOError at once."""
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s lock (``run.lock``) while a run trains into it; a second run is refused,
    told who holds it.

    ``flock`` on the file, so the lock dies with its holder however it dies (no stale lock to clear
    by hand). The file names the holder (pid, host, since when) and goes on release; one left by a
    killed holder is taken over with a note. Only the main process of a DDP run takes it.
    """
    path = Path(folder) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a+", encoding="utf-8")  # created if missing, never truncated before it is ours
        try:
            _lock_now(f)
        except BlockingIOError:
            f.seek(0)
            holder = _holder(f.read())
            f.close()
            raise RunLocked(f"{path.parent} is in use by another run ({holder}, holding {path}); wait for it to "
                            "end or stop it, or choose another output folder") from None
        try:  # a releasing holder removes the file: lock the file that is there now, not that one
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        f.seek(0)
        left = f.read()
        if left:  # a clean release removes the file: its holder was killed
            print(f"note: taking over {path}, left by {_holder(left)}, which no longer runs")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}))
        f.flush()
        yield
    finally:
        if os.name == "nt":  # Windows cannot remove a file that is open
            f.close()
        path.unlink(missing_ok=True)  # elsewhere while still locked: see the loop above
        f.close()


def begin_run(folder: str | os.PathLike, info: RunInfo, *, resume: bool, keep: Sequence[str] = ()) -> None:
    """Check ``folder`` before a stage trains into it, then record ``info`` as unfinished there.

    A folder holding a run made with other settings, parent or code is refused when resuming (its
    tokenizer, shards and checkpoint belong to that run); with ``resume=False`` the earlier run's
    files (:data:`RUN_FILES`) are removed first, so nothing of it is reused, but those named in
    ``keep`` (pretraining's prepared corpus, when it was prepared as the recipe asks)."""
    folder = Path(folder)
    if resume and (folder / RUN_FILE).exists():
        held = read_run(folder)
        why = held.differences(info)
        if why and held.stage != info.stage:  # --restart would delete a run of another kind: never advise it
            raise ValueError(f"{folder} holds a run made otherwise ({why[0]}); choose another output folder")
        if why:
            raise ValueError(f"{folder} holds a run made otherwise ({'; '.join(why)}); start it over with --restart "
                             "(resume=False), or choose another output folder")
    if not resume:
        for pattern in (p for p in RUN_FILES if p not in keep):
            for path in folder.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_run(folder, info)


def finish_run(folder: str | os.PathLike, info: RunInfo, **extra: Any) -> RunInfo:
    """Record in ``folder`` that its run finished, with what a loader needs (``extra``)."""
    done = dataclasses.replace(info, extra={**info.extra, **extra},
                               finished=_now())
    write_run(folder, done)
    return done


def run_dir(recipe: Recipe, stage: str) -> Path:
    """Where :func:`find_or_make` keeps ``stage``'s run of ``recipe``: one folder per stage and profile."""
    return cache_dir() / "runs" / recipe.name / stage


def _train(recipe: Recipe, stage: str, folder: Path, resume: bool, progress: bool) -> None:
    """Train ``stage`` into ``folder`` (SFT starts from the recipe's ``sft.base``, which finds the
    pretraining run): the stage's own function writes ``run.json``."""
    if stage == "pretrain":
        from minigpt.pretrain import pretrain

        pretrain(recipe, folder, resume=resume, progress=progress)
    elif stage == "sft":
        from minigpt.sft import sft

        sft(recipe, None, folder, resume=resume, progress=progress, keep_steps=recipe.sft.keep_steps)
    elif stage == "chat":
        from minigpt.chatbot import train_chat

        train_chat(recipe, folder, resume=resume, progress=progress)
    elif stage == "instruct":
        from minigpt.chatbot import train_instruct

        train_instruct(recipe, folder, resume=resume, progress=progress)
    else:
        raise ValueError(f"unknown stage {stage!r}; find_or_make knows {', '.join(STAGES)}")


def find_or_make(recipe: Recipe, stage: str, *, progress: bool = False,
                 say: Callable[[str], None] = print) -> Path:
    """The folder of ``stage``'s run of ``recipe`` (:func:`run_dir`), trained first unless a
    finished run with the same recipe part, parent run and code is there. A run made otherwise is
    trained again from scratch, and ``say`` is told why; an unfinished one continues."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    parent_stage = STAGES[stage][2]
    parent = find_or_make(recipe, parent_stage, progress=progress, say=say) if parent_stage else None
    wanted = run_info(recipe, stage, parent=read_run(parent).key if parent else None)
    folder = run_dir(recipe, stage)
    resume = True
    if (folder / RUN_FILE).exists():
        try:
            cached = read_run(folder)
            why = cached.differences(wanted)
        except (ValueError, TypeError) as err:  # a damaged or foreign run.json: train again
            cached, why = None, [str(err)]
        if not why and cached.finished:
            return folder
        if why:
            say(f"{stage} ({recipe.name}): training again, because the cached run differs: " + "; ".join(why))
            resume = False
        else:
            say(f"{stage} ({recipe.name}): continuing the unfinished run in {folder}")
    else:
        say(f"{stage} ({recipe.name}): no cached run yet; training it into {folder}")
        resume = False
    _train(recipe, stage, folder, resume, progress)
    return folder


def _model_of(info: RunInfo, folder: Path, config: GPTConfig, tokenizer: BPETokenizer) -> GPT:
    """Random weights of the class that trained: a GPT, or chapter 14's CoupledGPT, whose positions
    come from its tokens (loaded as a plain GPT it would read every token at the wrong position)."""
    name = info.extra.get("model_class")
    if name is None:
        return GPT(config)
    if name != "minigpt.reasoning.CoupledGPT":
        raise ValueError(f"{folder / RUN_FILE} names the model class {name}, which load_run cannot rebuild: load its "
                         f"checkpoint into that class yourself (minigpt.checkpoint.load_checkpoint)")
    from minigpt.reasoning import CoupledGPT  # reasoning imports sft, which imports this module

    return CoupledGPT(config, tokenizer)


def load_run(folder: str | os.PathLike, *, step: int | None = None,
             device: str | None = None) -> tuple[GPT, BPETokenizer]:
    """The model (in eval mode) and tokenizer of any run folder: its last checkpoint or the one
    kept at ``step``, with LoRA's adapters (or another method's of :mod:`minigpt.peft`) in place
    when the run trained them."""
    folder = Path(folder)
    info = read_run(folder)
    path = folder / "checkpoint.safetensors" if step is None else kept_checkpoint_path(folder, step)
    if not path.exists():
        kept = f"; it keeps no checkpoint of step {step}" if step is not None else ""
        raise FileNotFoundError(f"{path} does not exist: the {info.stage} run in {folder} has not saved it{kept}")
    config = checkpoint_config(path)  # a corrupt or impossible checkpoint is refused first, by its name
    tokenizer = BPETokenizer.load(folder / "tokenizer.bpe")
    model = _model_of(info, folder, config, tokenizer)
    if info.extra.get("lora"):
        lora = info.extra["lora"]
        apply_lora(model, **{**lora, "targets": tuple(lora["targets"]), "train_also": tuple(lora["train_also"])})
    if info.extra.get("peft"):
        apply_peft(model, **info.extra["peft"])
    load_checkpoint(path, model)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval(), tokenizer


def read_history(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, one per logged step (:func:`~minigpt.train.read_metrics`)."""
    path = Path(folder) / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


@dataclass
class Run:
    """A run folder opened: what ``run.json`` says, the model (in eval mode), its tokenizer and
    its metrics; ``info.extra`` holds what the stage measured at the end (SFT's exact match)."""

    folder: Path
    info: RunInfo
    model: GPT
    tokenizer: BPETokenizer
    history: list[dict[str, Any]]


def open_run(folder: str | os.PathLike, *, step: int | None = None, device: str | None = None) -> Run:
    """Everything of a run folder at once (:func:`read_run`, :func:`load_run`, :func:`read_history`)."""
    model, tokenizer = load_run(folder, step=step, device=device)
    return Run(Path(folder), read_run(folder), model, tokenizer, read_history(folder))


def trained(recipe: Recipe, stage: str, *, step: int | None = None,
            progress: bool = False) -> tuple[GPT, BPETokenizer]:
    """``stage``'s model of ``recipe`` and its tokenizer (:func:`find_or_make`, then :func:`load_run`)."""
    return load_run(find_or_make(recipe, stage, progress=progress), step=step, device=recipe.device)
