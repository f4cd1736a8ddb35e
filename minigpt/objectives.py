"""Two ways to train the same Transformer: GPT's causal objective and BERT's masked one (chapter 0).

A decoder-only model such as GPT learns :math:`p(x_t \\mid x_{<t})`: every position predicts the
next token, and the causal mask keeps it from seeing that token. An encoder such as BERT
(Devlin et al. 2019) attends in both directions, so the next token would be in plain sight;
it learns instead to restore tokens that were hidden from it, from the context on both sides:
the *masked language model*. Why keep both in the package? Because "why is ChatGPT a decoder?"
is best answered by training the same network both ways and asking each for what generation
needs, the next token after a text. Here:

* :func:`mask_tokens`: BERT's corruption (15% of the positions chosen; of those, 80% become the
  mask token, 10% a random token, 10% stay), returning inputs and targets for
  :class:`~minigpt.model.GPT` (targets -100 where nothing is asked);
* :class:`TextWindows`: random windows of a token sequence as batches for either objective, a
  batch source for the package's :class:`~minigpt.train.Trainer`;
* :func:`score_objectives`: the three questions of the chapter, on the same held-out tokens;
* :func:`compare_objectives`: all of it from a recipe, for the chapter and its outcome test.

The masked model is the same :class:`~minigpt.model.GPT` with ``causal=False`` (no mask in its
attention); its logits at position t are its guess for the token *at* t, not after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from minigpt.data import shakespeare_text
from minigpt.model import GPT, GPTConfig, evaluating
from minigpt.tokenizer import CharTokenizer
from minigpt.train import SeededBatches, TrainConfig, Trainer

if TYPE_CHECKING:
    from minigpt.recipe import Recipe

Objective = Literal["causal", "masked"]
#: BERT's split of the chosen positions: MASK_SHARE of them become the mask token, RANDOM_SHARE a
#: random token, and the rest stay as they were.
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1


def mask_tokens(idx: torch.Tensor, mask_id: int, vocab_size: int, rate: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption of token ids ``idx`` (any shape): ``(inputs, targets)``.

    Each position is chosen independently with probability ``rate`` (as Hugging Face's
    ``DataCollatorForLanguageModeling`` does; BERT's own script picks a fixed number, about ``rate * T``).
    A chosen position becomes ``mask_id`` with probability 0.8, a random id of ``0 .. vocab_size - 1``
    with probability 0.1, and keeps its token otherwise: the model cannot tell which inputs are
    intact, so it must keep a good guess for every position, not only the masked ones. ``targets``
    holds the original token at the chosen positions and -100 (left out of the loss) elsewhere.

    Three draws from ``generator``, in this order: which positions, which fate, which random ids.
    Give ``mask_id`` outside ``0 .. vocab_size - 1`` (``vocab_size`` itself, say) so that a random
    id is never the mask.
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate={rate} must be in (0, 1]: the share of positions the model is asked to restore")
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be at least 1: random replacements are drawn from it")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"idx must hold integer token ids, got {idx.dtype}")
    chosen = torch.rand(idx.shape, generator=generator).to(idx.device) < rate
    fate = torch.rand(idx.shape, generator=generator).to(idx.device)
    random_ids = torch.randint(vocab_size, idx.shape, generator=generator).to(idx.device, idx.dtype)
    inputs = torch.where(chosen & (fate < MASK_SHARE), torch.full_like(idx, mask_id), idx)
    inputs = torch.where(chosen & (fate >= MASK_SHARE) & (fate < MASK_SHARE + RANDOM_SHARE), random_ids, inputs)
    targets = torch.where(chosen, idx, torch.full_like(idx, -100))
    return inputs, targets


class TextWindows(SeededBatches):
    """Random windows of ``block_size`` tokens of ``data`` (1-D), as batches for one objective.

    ``"causal"``: inputs the window, targets the next tokens (the window shifted by one).
    ``"masked"``: the same window through :func:`mask_tokens` (needs ``mask_id`` and
    ``vocab_size``). Batch ``i`` is drawn from a generator seeded with ``(seed, i)`` and the
    windows are drawn first, so two sources with the same seed read the same text whatever
    their objective. A batch source for :class:`~minigpt.train.Trainer`.
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, objective: Objective = "causal", *,
                 mask_id: int | None = None, vocab_size: int | None = None, rate: float = 0.15,
                 seed: int = 0) -> None:
        if objective not in ("causal", "masked"):
            raise ValueError(f"objective={objective!r} must be 'causal' or 'masked'")
        if objective == "masked" and (mask_id is None or vocab_size is None):
            raise ValueError("the masked objective needs mask_id and vocab_size (see mask_tokens)")
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size={block_size} and batch_size={batch_size} must be at least 1")
        if data.dim() != 1 or len(data) < block_size + 2:
            raise ValueError(f"data must be 1-D with more than block_size + 1 = {block_size + 1} tokens, "
                             f"got shape {tuple(data.shape)}")
        self.data, self.block_size, self.batch_size, self.objective = data, block_size, batch_size, objective
        self.mask_id, self.vocab_size, self.rate, self.seed = mask_id, vocab_size, rate, seed
        self.index = 0

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` windows as ``(inputs, targets)``, each ``(n, block_size)``."""
        starts = torch.randint(len(self.data) - self.block_size - 1, (n,), generator=generator)
        rows = torch.stack([self.data[s:s + self.block_size + 1] for s in starts.tolist()])
        if self.objective == "causal":
            return rows[:, :-1], rows[:, 1:]
        return mask_tokens(rows[:, :-1], self.mask_id, self.vocab_size, self.rate, generator)  # type: ignore[arg-type]



def held_out_windows(data: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    """``n`` windows of ``block_size`` tokens (fewer if ``data`` is short), starting at evenly
    spaced points of ``data``: the same test set every time, no random draw."""
    last = len(data) - block_size
    if last < 0:
        raise ValueError(f"{len(data)} tokens hold no window of {block_size}")
    starts = torch.linspace(0, last, min(n, last + 1)).round().long().unique()
    return torch.stack([data[s:s + block_size] for s in starts.tolist()])


@dataclass
class ObjectiveScores:
    """Accuracy (argmax = the true token) on the same held-out tokens, the token at ``position``
    of each window, asked three ways."""

    masked_both_sides: float  # the masked model, that token masked, the window on both sides visible
    causal_next: float  # the causal model, reading the tokens before it: next-token prediction
    masked_left_only: float  # the masked model, given the tokens before it and a mask: what generation asks
    position: int
    n: int  # windows scored


@torch.no_grad()
def score_objectives(causal: GPT, masked: GPT, windows: torch.Tensor, mask_id: int,
                     position: int | None = None) -> ObjectiveScores:
    """Ask both models for the token at ``position`` (default: the middle) of every row of
    ``windows`` (N, T): the masked model with that token masked and the rest of the window in view
    (it sees both sides), the causal model from the tokens before it, and the masked model from the
    tokens before it followed by a mask (nothing to its right: the question generation asks)."""
    if causal.config.causal is not True or masked.config.causal is not False:
        raise ValueError("score_objectives takes a causal model (causal=True), then a masked one (causal=False)")
    N, T = windows.shape
    p = T // 2 if position is None else position
    if not 1 <= p < T:
        raise ValueError(f"position={p} must be in 1 .. {T - 1}: the causal model needs a token before it")
    truth = windows[:, p]
    with evaluating(causal, masked):
        both = windows.clone()
        both[:, p] = mask_id
        a = masked(both)[0][:, p].argmax(-1)
        b = causal(windows[:, :p])[0][:, -1].argmax(-1)
        left = torch.cat([windows[:, :p], torch.full((N, 1), mask_id, dtype=windows.dtype)], dim=1)
        c = masked(left)[0][:, -1].argmax(-1)
    acc = [(guess == truth).float().mean().item() for guess in (a, b, c)]
    return ObjectiveScores(*acc, position=p, n=N)


@dataclass
class ObjectivesRun:
    """:func:`compare_objectives`' result: the two trained models and what they were trained and
    scored on."""

    tokenizer: CharTokenizer
    mask_id: int  # the id after the tokenizer's characters
    causal: GPT
    masked: GPT
    val: torch.Tensor  # the held-out tokens (1-D)
    windows: torch.Tensor  # the scored windows of ``val`` (N, block_size)
    scores: ObjectiveScores
    seconds: dict[str, float] = field(default_factory=dict)  # training time of each model
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # each Trainer's records


def objectives_config(recipe: Recipe, vocab_size: int, causal: bool) -> GPTConfig:
    """The model of ``recipe.objectives``: causal (GPT) or bidirectional (an encoder, BERT)."""
    o = recipe.objectives
    return GPTConfig(vocab_size=vocab_size, block_size=o.block_size, n_layer=o.n_layer, n_head=o.n_head,
                     n_embd=o.n_embd, position=o.position, causal=causal)  # type: ignore[arg-type]


def compare_objectives(recipe: Recipe, *, progress: bool = False) -> ObjectivesRun:
    """Train the model of ``recipe.objectives`` twice on the same characters of Shakespeare, from
    the same initial weights, with the same optimiser, steps and windows: once causal with the
    causal objective, once bidirectional (``causal=False``) with :func:`mask_tokens`; then
    :func:`score_objectives` on held-out text.

    Characters are the tokens (:class:`~minigpt.tokenizer.CharTokenizer` on the recipe's
    ``tokenizer.corpus_chars`` characters, the last tenth held out), with one more id for the mask.
    """
    o = recipe.objectives
    text = shakespeare_text(recipe.tokenizer.corpus_chars)
    tok = CharTokenizer.from_text(text)
    data = torch.tensor(tok.encode(text))
    split = int(len(data) * 0.9)
    train, val = data[:split], data[split:]
    mask_id = tok.vocab_size
    cfg = TrainConfig.from_recipe(recipe, max_steps=o.steps, learning_rate=o.learning_rate,
                                  warmup_steps=max(1, o.steps // 10), eval_interval=0, checkpoint_interval=0,
                                  log_interval=max(1, o.steps // 20))
    models, seconds, history = {}, {}, {}
    for objective in ("causal", "masked"):
        torch.manual_seed(cfg.seed)  # the same initial weights for both
        model = GPT(objectives_config(recipe, tok.vocab_size + 1, causal=objective == "causal"))
        source = TextWindows(train, o.block_size, o.batch_size, objective, mask_id=mask_id,
                             vocab_size=tok.vocab_size, rate=o.mask_rate, seed=cfg.seed)
        start = time.perf_counter()
        history[objective] = Trainer(model, cfg, source, device=recipe.device).fit(progress=progress)
        seconds[objective] = time.perf_counter() - start
        models[objective] = model.cpu()
    windows = held_out_windows(val, o.block_size, o.n_test)
    scores = score_objectives(models["causal"], models["masked"], windows, mask_id)
    return ObjectivesRun(tok, mask_id, models["causal"], models["masked"], val, windows, scores, seconds, history)


__all__ = ["MASK_SHARE", "RANDOM_SHARE", "ObjectiveScores", "ObjectivesRun", "TextWindows", "compare_objectives",
           "held_out_windows", "mask_tokens", "objectives_config", "score_objectives"]
