"""HellaSwag: can the model tell how an everyday scene goes on?

Each item is a context ("A man is sitting on a roof. He") and four endings, one of them right;
the wrong ones were written by a model and kept because they fooled other models, while people
pick the right one 95% of the time. A language model answers without being asked anything: it
scores each ending by its own loss on the ending's tokens, read after the context, and picks
the most likely one. No prompt format and no sampling, so it measures a base model as it is.

Two ways to compare endings of different lengths:

* ``acc`` -- the lowest **summed** loss over the ending's tokens (the whole ending's log-likelihood),
  which favours short endings;
* ``acc_norm`` -- the lowest **mean** loss per ending token, the figure build-nanogpt and llm.c
  report. GPT-2 124M scores about 0.295 on the 10,042 validation items (build-nanogpt: ``acc_norm``
  0.2955, ``acc`` 0.2859); chance is 0.25. (lm-evaluation-harness's ``acc_norm`` divides by the
  ending's length in bytes instead and cleans up the text first, so its figures differ.)

The context is ``encode(ctx)`` and each ending ``encode(" " + ending)``: the space belongs to the
ending, as it would in running text. The validation items come from the Hub (``Rowan/hellaswag``
through ``datasets``); ``data_files`` reads local JSON/JSONL rows in the same schema instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from minigpt.data import hub_failures, require_hub
from minigpt.logprobs import pack, token_logprobs
from minigpt.model import GPT, evaluating

__all__ = ["GPT2_NAMES", "HUB_ID", "HellaSwagItem", "ending_losses", "fit_row", "item_from_row", "load_items",
           "score_items"]

#: Where the validation items live on the Hub (10,042 rows with ``ctx``, ``endings``, ``label``).
HUB_ID = "Rowan/hellaswag"
#: The GPT-2 checkpoints ``minigpt eval hellaswag`` loads by name (:meth:`~minigpt.model.GPT.from_pretrained`).
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
#: What to do instead of the Hub: the CLI's flag and the function's argument.
OFFLINE_REMEDY = "or give the items as local JSON/JSONL rows in its schema with --data-files (data_files= in Python)"

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class HellaSwagItem:
    """A context, its four candidate endings and the index of the right one."""

    context: str
    endings: tuple[str, ...]
    label: int


def item_from_row(row: Mapping[str, Any], where: str = "row") -> HellaSwagItem:
    """A Hub row (``ctx``, ``endings``, ``label``; the label is a string there) as an item, or a
    ValueError that names ``where`` the row came from and what is wrong with it."""
    try:
        context, endings, label = row["ctx"], row["endings"], row["label"]
    except KeyError as err:
        raise ValueError(f"{where} has no field {err}; HellaSwag rows have ctx, endings (4) and label (0-3)") from None
    if not isinstance(context, str) or not context.strip():
        raise ValueError(f"{where}: ctx must be a non-empty string, got {context!r}")
    if not isinstance(endings, (list, tuple)) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: endings must be a list of 4 strings, got {endings!r}")
    try:
        label = int(label)
    except (TypeError, ValueError):
        label = -1
    if not 0 <= label <= 3:
        raise ValueError(f"{where}: label must be 0, 1, 2 or 3 (the right ending's index), got {row['label']!r}")
    return HellaSwagItem(context, tuple(endings), label)


def load_items(*, data_files: str | Path | Sequence[str | Path] | None = None,
               limit: int | None = None) -> list[HellaSwagItem]:
    """HellaSwag's validation items from the Hub (:data:`HUB_ID`), or from local JSON/JSONL
    ``data_files`` in its schema (no network then); the first ``limit`` of them if given.

    Offline, the Hub fails in seconds with what to do (:func:`~minigpt.data.require_hub`); a
    row out of schema is refused by its file and number rather than skipped, since a benchmark
    that quietly drops items is no longer comparable."""
    import datasets  # the `data` extra: only the benchmark needs it

    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be at least 1")
    if data_files is None:
        what, where = f"HellaSwag's validation set (downloaded from {HUB_ID!r} through datasets)", HUB_ID
        require_hub(what, remedy=OFFLINE_REMEDY)
        with hub_failures(what, OFFLINE_REMEDY):  # streamed rows download while they are read
            rows = datasets.load_dataset(HUB_ID, split="validation", streaming=limit is not None)
            return [item_from_row(row, f"{where}, row {i}") for i, row in enumerate(islice(rows, limit))]
    files = [str(data_files)] if isinstance(data_files, (str, Path)) else [str(f) for f in data_files]
    where = ", ".join(files)
    empty = [f for f in files if Path(f).is_file() and not Path(f).read_bytes().strip(b" \t\r\n[]")]
    if empty:  # datasets raises a bare StopIteration on an empty file, a riddle on "[]"
        raise ValueError(f"{empty[0]} holds no HellaSwag rows; give a JSON or JSONL file of items")
    try:
        rows = datasets.load_dataset("json", data_files=files, split="train")
    except datasets.exceptions.DatasetGenerationError as err:
        raise ValueError(f"{where} is not JSON or JSONL rows ({err.__cause__ or err})") from None
    return [item_from_row(row, f"{where}, row {i}") for i, row in enumerate(islice(rows, limit))]


def fit_row(context: Sequence[int], ending: Sequence[int], block_size: int) -> tuple[list[int], list[int]]:
    """``context`` and ``ending`` cut so that ``context + ending`` fits one input of ``block_size``
    tokens (plus the last token, which is only ever a target): the context loses tokens from its
    **left**, so what stays next to the ending is kept; an ending longer than the model's whole
    context keeps its first ``block_size`` tokens. At least one context token always stays, to
    predict the ending's first token from."""
    if not context or not ending:
        raise ValueError("a row needs at least one context token and one ending token")
    ending = list(ending[:block_size])
    return list(context[-(block_size + 1 - len(ending)):]), ending


def ending_losses(model: GPT, encode: Encode, items: Sequence[HellaSwagItem], *, batch_size: int = 16,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ending's summed loss (nats) and its number of tokens, both (len(items), 4), on the CPU.

    ``batch_size`` items (4 rows each, right-padded by :func:`minigpt.logprobs.pack`) go through one
    forward pass, and :func:`~minigpt.logprobs.token_logprobs` scores the endings' tokens, running
    the output head at their positions only. ``model`` must be the
    plain :class:`~minigpt.model.GPT` (not a DDP wrapper), on the device it scores on; ``dtype``
    autocasts its matmuls (bf16 on a GPU). It runs in eval mode without gradients and gives the
    model back in the mode it had. Rows longer than the model's context are cut by :func:`fit_row`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    device, block = model.transformer.wte.weight.device, model.config.block_size
    cast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    sums, counts = [], []
    with evaluating(model), torch.no_grad(), cast:
        for start in range(0, len(items), batch_size):
            rows = []
            for item in items[start:start + batch_size]:
                context_ids = encode(item.context)
                rows += [fit_row(context_ids, encode(" " + ending), block) for ending in item.endings]
            batch = pack([context for context, _ in rows], [ending for _, ending in rows], device=device)
            sums.append(-token_logprobs(model, batch.ids, mask=batch.mask).sum(1).view(-1, 4).cpu())
            counts.append(batch.mask.sum(1).view(-1, 4).cpu())
    if not sums:
        return torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.long)
    return torch.cat(sums), torch.cat(counts)


def score_items(model: GPT, encode: Encode, items: Sequence[HellaSwagItem], *, batch_size: int = 16,
                dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """``{"acc", "acc_norm", "n"}`` of ``model`` on ``items``: the share picked right by the lowest
    summed and the lowest mean ending loss (see the module's doc), and how many items counted.

    With ``world_size > 1`` each rank scores ``items[rank::world_size]`` and the counts are summed
    over the process group (``torch.distributed``, already initialised), so every rank returns the
    figure of all the items: call it on every rank, during distributed training for instance.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    mine = list(items[rank::world_size])
    sums, counts = ending_losses(model, encode, mine, batch_size=batch_size, dtype=dtype)
    labels = torch.tensor([item.label for item in mine], dtype=torch.long)
    right = torch.tensor([int((sums.argmin(1) == labels).sum()), int(((sums / counts).argmin(1) == labels).sum()),
                          len(mine)], device=model.transformer.wte.weight.device)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(right)
    acc, acc_norm, n = right.tolist()
    if n == 0:
        raise ValueError("no items to score")
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}
