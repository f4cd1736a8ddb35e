"""Fine-tuning for tasks: a GPT trunk with a classification head instead of the language head.

Two heads read the trunk's final hidden states (:meth:`minigpt.model.GPT.hidden`):

* :class:`SequenceClassifier` -- one label per text, read at the **last real token**: in a causal
  model it is the only position that has seen the whole text. Rows are right-padded with
  ``pad_id``; a pad never sits before a real token, so the padding cannot change the logits.
  (Hugging Face's ``GPT2ForSequenceClassification`` does the same.)
* :class:`TokenClassifier` -- one label per token (tagging, e.g. named entities). Targets are
  ``-100`` wherever nothing is to be learned: padding, and every token of a word but its last
  (:func:`encode_tagged`), so each *word* counts once and its tag is read where the model has
  seen all of it. A causal model sees only the words to the left, which is why
  :func:`minigpt.tasks.data.entity_tags` lets the left context decide every tag.

Both return ``(logits, loss)`` from ``forward(idx, targets)`` as :class:`~minigpt.model.GPT`
does, so :func:`fine_tune` trains them with the book's one :class:`~minigpt.train.Trainer`
(AdamW, warmup and cosine decay, clipping). Three ways to train, by ``mode``: ``"full"`` (every
weight), ``"head"`` (a frozen trunk: a linear probe of what pretraining learned) and ``"lora"``
(adapters on the trunk, :mod:`minigpt.lora`, and the head).

:func:`classification_report` is the classic table: precision, recall, F1 and support per class,
accuracy, and the macro (mean over classes) and weighted (by support) averages. A ratio whose
denominator is zero (precision of a class never predicted, recall of a class absent from the
data) is defined as 0, as scikit-learn's ``zero_division=0`` does. :func:`majority_class` gives
the baseline every classifier has to beat: always answer the training set's commonest class.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.lora import apply_lora, trainable_fraction
from minigpt.model import GPT, evaluating
from minigpt.pretrain import EOT
from minigpt.recipe import Recipe
from minigpt.runs import trained
from minigpt.tasks import ENTITY_TAGS, SENTIMENTS, Labeled, Tagged, entity_tags, reviews
from minigpt.tokenizer import BPETokenizer
from minigpt.train import TrainConfig, Trainer

__all__ = [
    "ClassStats",
    "Classifier",
    "ClassifyRun",
    "ClassificationSource",
    "Mode",
    "Report",
    "SequenceClassifier",
    "TASKS",
    "TokenClassifier",
    "classification_report",
    "classify",
    "confusion_matrix",
    "encode_labeled",
    "encode_tagged",
    "fine_tune",
    "majority_class",
    "predict",
    "prepare",
]

Mode = Literal["full", "head", "lora"]
Row = tuple[list[int], int | list[int]]  # token ids and a label, or one target per token


# ---------------------------------------------------------------------------------------------
# The heads
# ---------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """A copy of a GPT trunk and a linear head onto ``len(labels)`` classes."""

    def __init__(self, body: GPT, labels: Sequence[str]) -> None:
        super().__init__()
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least two labels, got {list(labels)}")
        self.body = copy.deepcopy(body).train()  # the base model is never changed
        self.labels = tuple(labels)
        self.head = nn.Linear(body.config.n_embd, len(labels))
        # Small logits at the start: every class about equally likely, as a fresh head should say.
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def flops_per_token(self) -> int:
        """The trunk's training FLOPs per token (the head adds a negligible n_embd x classes):
        what :class:`~minigpt.train.Trainer` reports MFU with on a GPU."""
        return self.body.flops_per_token()


class SequenceClassifier(Classifier):
    """One label per sequence, read from the hidden state at each row's last non-pad token."""

    def __init__(self, body: GPT, labels: Sequence[str], pad_id: int) -> None:
        super().__init__(body, labels)
        self.pad_id = pad_id

    def last_index(self, idx: torch.Tensor) -> torch.Tensor:
        """The position of each row's last token that is not ``pad_id``, (B,)."""
        real = idx != self.pad_id
        if not real.any(dim=1).all():
            raise ValueError(f"a row of the batch is all padding (pad_id={self.pad_id}); every text needs a token")
        positions = torch.arange(idx.size(1), device=idx.device)
        return torch.where(real, positions, -1).amax(dim=1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """Class logits (B, classes) and, given ``targets`` (B,), the mean cross-entropy."""
        h = self.body.hidden(idx)[torch.arange(idx.size(0), device=idx.device), self.last_index(idx)]
        logits = self.head(h)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss


class TokenClassifier(Classifier):
    """One label per token; targets of ``-100`` are left out of the loss."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """Logits (B, T, classes) and, given ``targets`` (B, T), the mean cross-entropy over the
        positions whose target is not -100."""
        logits = self.head(self.body.hidden(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss


def prepare(model: Classifier, mode: Mode, *, lora_rank: int = 4) -> Classifier:
    """Choose what trains, in place: everything (``"full"``), the head alone (``"head"``), or LoRA
    adapters on every linear layer of the trunk plus its final LayerNorm (``"lora"``); the head
    always trains. Returns ``model``."""
    if mode not in ("full", "head", "lora"):
        raise ValueError(f"mode={mode!r} must be 'full', 'head' or 'lora'")
    if mode == "head":
        model.body.requires_grad_(False)
    elif mode == "lora":
        apply_lora(model.body, r=lora_rank, alpha=2.0 * lora_rank, train_also=("ln_f",))
    return model


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def encode_labeled(tokenizer: BPETokenizer, examples: Sequence[Labeled], block_size: int) -> list[Row]:
    """Texts -> ``(ids, label)`` rows; a text longer than ``block_size`` tokens is refused."""
    rows: list[Row] = []
    for i, (ids, ex) in enumerate(zip(tokenizer.encode_batch([e.text for e in examples]), examples)):
        if not ids or len(ids) > block_size:
            raise ValueError(f"example {i} encodes to {len(ids)} tokens; a text needs 1 to block_size={block_size}")
        rows.append((ids, ex.label))
    return rows


def encode_tagged(tokenizer: BPETokenizer, examples: Sequence[Tagged], block_size: int) -> list[Row]:
    """Tagged words -> ``(ids, targets)`` rows: each word is encoded on its own (with the space
    before it, as :attr:`~minigpt.tasks.data.Tagged.text` writes it), its tag is the target of its last
    token and -100 that of the others, so every word counts once."""
    rows: list[Row] = []
    for i, ex in enumerate(examples):
        if len(ex.words) != len(ex.tags):
            raise ValueError(f"example {i} has {len(ex.words)} words but {len(ex.tags)} tags")
        ids: list[int] = []
        targets: list[int] = []
        for j, (word, tag) in enumerate(zip(ex.words, ex.tags)):
            piece = tokenizer.encode(word if j == 0 or word in ".," else " " + word)
            ids += piece
            targets += [-100] * (len(piece) - 1) + [tag]
        if len(ids) > block_size:
            raise ValueError(f"example {i} encodes to {len(ids)} tokens, more than block_size={block_size}")
        rows.append((ids, targets))
    return rows


class ClassificationSource:
    """A :class:`~minigpt.train.BatchSource` over encoded rows: inputs right-padded with
    ``pad_id``, targets a (B,) tensor of labels or, for per-token targets, (B, T) padded with -100.
    A fresh permutation per epoch from ``(seed, epoch)``, as :class:`~minigpt.sft.SFTSource`."""

    def __init__(self, rows: Sequence[Row], batch_size: int, pad_id: int, *, seed: int = 0,
                 shuffle: bool = True) -> None:
        if not rows:
            raise ValueError("no examples to serve")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.rows, self.pad_id, self.seed, self.shuffle = list(rows), pad_id, seed, shuffle
        self.batch_size = min(batch_size, len(self.rows))
        self.per_token = isinstance(self.rows[0][1], list)
        # A sequence classifier finds each row's last token as the last one that is not pad_id.
        holding = None if self.per_token else next((i for i, (ids, _) in enumerate(self.rows) if pad_id in ids), None)
        if holding is not None:
            raise ValueError(f"row {holding} holds the pad id {pad_id}, which the classifier would take for padding: "
                             "pad with an id no text uses (classify pads with the end-of-text token)")
        self.reset()

    def __len__(self) -> int:
        return len(self.rows)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.rows)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def collate(self, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for r, (ids, _) in enumerate(rows):
            x[r, :len(ids)] = torch.tensor(ids)
        if not self.per_token:
            return x, torch.tensor([label for _, label in rows], dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (_, targets) in enumerate(rows):
            y[r, :len(targets)] = torch.tensor(targets)
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self.rows):  # the epoch is used up: a new order
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        chosen = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.collate([self.rows[i] for i in chosen])

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every row once, in order, in batches (the last one may be smaller): for evaluation."""
        return [self.collate(self.rows[i:i + self.batch_size]) for i in range(0, len(self.rows), self.batch_size)]

    def reset(self) -> None:
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


# ---------------------------------------------------------------------------------------------
# Training and prediction
# ---------------------------------------------------------------------------------------------


def fine_tune(model: Classifier, train: ClassificationSource, cfg: TrainConfig, *,
              val: ClassificationSource | None = None, device: str = "cpu", progress: bool = True) -> Trainer:
    """Train ``model`` (what :func:`prepare` left trainable) with the book's
    :class:`~minigpt.train.Trainer`; returns it (``.history`` holds the losses)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing in the model is trainable; call prepare(model, mode) first")
    torch.manual_seed(cfg.seed)
    trainer = Trainer(model, cfg, train, val, device=device)  # type: ignore[arg-type]  # a GPT in all but name
    trainer.fit(progress=progress)
    model.eval()
    return trainer


@torch.no_grad()
def predict(model: Classifier, source: ClassificationSource) -> tuple[list[int], list[int]]:
    """The true and the predicted class of every example (every target that is not -100, for a
    token classifier), over one pass of ``source`` in order."""
    device = model.head.weight.device
    true: list[int] = []
    pred: list[int] = []
    with evaluating(model):
        for x, y in source.batches():
            logits, _ = model(x.to(device))
            guess = logits.argmax(-1).cpu()
            keep = y != -100
            true += y[keep].tolist()
            pred += guess[keep].tolist()
    return true, pred


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassStats:
    """Precision, recall, F1 and support (number of true examples) of one class or one average."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Report:
    """What :func:`classification_report` returns; ``str(report)`` is the readable table."""

    labels: tuple[str, ...]
    per_class: dict[str, ClassStats]
    accuracy: float
    macro: ClassStats
    weighted: ClassStats

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers, e.g. for JSON or a data frame."""
        rows = {name: dataclasses.asdict(s) for name, s in self.per_class.items()}
        return {**rows, "accuracy": self.accuracy, "macro avg": dataclasses.asdict(self.macro),
                "weighted avg": dataclasses.asdict(self.weighted)}

    def __str__(self) -> str:
        width = max(len("weighted avg"), *(len(n) for n in self.labels))
        head = f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}"

        def line(name: str, s: ClassStats) -> str:
            return f"{name:>{width}} {s.precision:>9.3f} {s.recall:>9.3f} {s.f1:>9.3f} {s.support:>9}"

        lines = [head, "", *(line(n, self.per_class[n]) for n in self.labels), "",
                 f"{'accuracy':>{width}} {'':>9} {'':>9} {self.accuracy:>9.3f} {self.macro.support:>9}",
                 line("macro avg", self.macro), line("weighted avg", self.weighted)]
        return "\n".join(lines)


def _ratio(a: int, b: int) -> float:
    """a / b, with 0 / 0 defined as 0 (see the module docstring)."""
    return a / b if b else 0.0


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts (n_classes, n_classes): row = true class, column = predicted class."""
    true, pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if true.shape != pred.shape or true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be two flat sequences of equal length, got "
                         f"{true.shape} and {pred.shape}")
    for name, ids in (("y_true", true), ("y_pred", pred)):
        if ids.size and (ids.min() < 0 or ids.max() >= n_classes):
            raise ValueError(f"{name} holds class ids outside 0..{n_classes - 1}; give one label name per class id")
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (true, pred), 1)
    return counts


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> Report:
    """Per-class precision TP / (TP + FP), recall TP / (TP + FN), F1 (their harmonic mean) and
    support, for class ids ``0..len(labels) - 1`` named by ``labels``; plus accuracy and the
    macro and weighted averages. 0 / 0 is 0: a class never predicted has precision 0."""
    if len(y_true) == 0:
        raise ValueError("classification_report needs at least one example")
    counts = confusion_matrix(y_true, y_pred, len(labels))
    per_class = {}
    for k, name in enumerate(labels):
        tp, predicted, support = int(counts[k, k]), int(counts[:, k].sum()), int(counts[k].sum())
        p, r = _ratio(tp, predicted), _ratio(tp, support)
        per_class[name] = ClassStats(p, r, 2 * p * r / (p + r) if p + r else 0.0, support)
    total = int(counts.sum())
    stats = list(per_class.values())

    def average(weights: Sequence[float]) -> ClassStats:
        w = sum(weights)
        return ClassStats(*(sum(getattr(s, f) * x for s, x in zip(stats, weights)) / w
                            for f in ("precision", "recall", "f1")), total)

    return Report(tuple(labels), per_class, float(np.trace(counts)) / total,
                  average([1.0] * len(stats)), average([float(s.support) for s in stats]))


def majority_class(y_train: Sequence[int]) -> int:
    """The commonest class of the training labels (the smallest id on a tie): the baseline
    classifier answers it for every example."""
    if len(y_train) == 0:
        raise ValueError("majority_class needs at least one training label")
    counts = Counter(y_train)
    return min(counts, key=lambda k: (-counts[k], k))


# ---------------------------------------------------------------------------------------------
# Settings and the run
# ---------------------------------------------------------------------------------------------


#: The offline classification tasks: name -> (kind, class names).
TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sentiment": ("sequence", SENTIMENTS),
    "entities": ("token", ENTITY_TAGS),
}


@dataclass
class ClassifyRun:
    """What :func:`classify` returns: the trained model, its trainer (history), the held-out
    report and the majority-class baseline's report on the same examples."""

    model: Classifier
    trainer: Trainer
    report: Report
    baseline: Report
    trainable: float  # the fraction of parameters that trained

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.trainer.history


def classify(recipe: Recipe, task: str, mode: Mode = "full", *, base: GPT | None = None,
             tokenizer: BPETokenizer | None = None, progress: bool = True,
             **train_overrides: Any) -> ClassifyRun:
    """Fine-tune a classifier for ``task`` (:data:`TASKS`) with ``recipe.classify`` from ``base``
    (default: the recipe's pretraining run, :func:`minigpt.runs.trained`) and report it on
    the held-out split against the majority class. ``train_overrides`` are
    :class:`~minigpt.train.TrainConfig` fields."""
    if task not in TASKS:
        raise ValueError(f"unknown classification task {task!r}; choose one of {', '.join(TASKS)}")
    s, seed = recipe.classify, recipe.seed
    if base is None:
        base, tokenizer = trained(recipe, "pretrain")
    if tokenizer is None:
        raise ValueError("pass the tokenizer the base model was trained with: classify(..., tokenizer=...)")
    kind, labels = TASKS[task]
    block = base.config.block_size
    if kind == "sequence":
        train_rows = encode_labeled(tokenizer, reviews(s.n_train, split="train", seed=seed, max_clauses=s.max_clauses),
                                    block)
        test_rows = encode_labeled(tokenizer, reviews(s.n_test, split="test", seed=seed, max_clauses=s.max_clauses),
                                   block)
    else:
        train_rows = encode_tagged(tokenizer, entity_tags(s.n_train, split="train", seed=seed), block)
        test_rows = encode_tagged(tokenizer, entity_tags(s.n_test, split="test", seed=seed), block)
    pad = tokenizer.special_tokens[EOT]
    torch.manual_seed(seed)  # the head's (and the adapters') initial weights
    model = SequenceClassifier(base, labels, pad) if kind == "sequence" else TokenClassifier(base, labels)
    prepare(model, mode, lora_rank=s.lora_rank)
    lr = {"full": s.learning_rate, "head": s.head_learning_rate, "lora": s.lora_learning_rate}[mode]
    cfg = TrainConfig.from_recipe(recipe, **{**dict(max_steps=s.steps, learning_rate=lr, warmup_steps=s.warmup_steps,
                                                    eval_interval=0, log_interval=10, checkpoint_interval=0,
                                                    compile=False), **train_overrides})
    train = ClassificationSource(train_rows, s.batch_size, pad, seed=seed)
    test = ClassificationSource(test_rows, 256, pad, shuffle=False)
    trainer = fine_tune(model, train, cfg, device=recipe.device, progress=progress)
    y_true, y_pred = predict(model, test)
    train_labels = [t for _, y in train_rows for t in (y if isinstance(y, list) else [y]) if t != -100]
    majority = majority_class(train_labels)
    return ClassifyRun(model, trainer, classification_report(y_true, y_pred, labels),
                       classification_report(y_true, [majority] * len(y_true), labels),
                       trainable_fraction(model))

