"""Sampling explorer: how temperature, top-k, top-p and min-p reshape the next-token distribution.

Python ships the logits of the next token and ``sampling.js`` applies the filters in the browser,
exactly as :func:`minigpt.generate.next_token_probs` does and in the same order (temperature,
top-k with ties kept, top-p keeping the most likely token and the smallest set whose mass is
>= p, min-p relative to the top probability; temperature 0 is greedy). The repetition penalty
is not a slider: a trace made with one records the logits *after* the penalty, so the JavaScript
starts from the same numbers the sampler saw.

**What is shipped, and when it is exact.** A vocabulary can be 50k tokens, so each step sends the
``n_top`` largest logits exactly (float32; more if the ``n_top``-th is tied, so no tie straddles
the cut) and summarises the remaining ``V - n_top`` as "other": their count, largest and smallest
logit, and for every temperature of the slider's grid (0.05, 0.10 ... 2.00, plus the temperatures
the explorer was built with) their log-sum-exp and mean (what the normaliser and the entropy need). From that the widget is exact whenever the
kept set is within the shipped tokens, or includes *all* the others: the shown probabilities,
the "other" bar and the entropy then equal ``next_token_probs`` (up to float32 vs float64
rounding). The tokens outside the top ``n_top`` are always less likely than the shipped ones, so
the filters treat "other" as a block at the end; the one case that cannot be exact is a filter
cutting *through* the other tokens (top-p needing some but not all of them, or min-p's
threshold falling between their smallest and largest probability). The widget then keeps the
whole block, marks the numbers with "≈" and sets ``data-exact="0"``. With a vocabulary of at
most ``n_top`` tokens (a character model) nothing is summarised and everything is exact.
:func:`filtered_distribution` is the Python twin of that JavaScript, line for line.

Ties: the tokens are sorted by logit, then by id. When top-p must choose between tied tokens,
the widget keeps the lower id; ``torch.sort`` leaves that order unspecified.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import traitlets

from minigpt.generate import apply_repetition_penalty, generate
from minigpt.model import GPT
from minigpt.viz._common import TextTokenizer, b64decode, b64encode, prompt_ids, token_label
from minigpt.viz._widget import StaticHTMLWidget, read_module

TEMPERATURE_STEP = 0.05
TEMPERATURE_MAX = 2.0
# The slider's temperatures (0 = greedy is handled apart): the "other" block is summarised at each.
TEMPERATURE_GRID: tuple[float, ...] = tuple(round(TEMPERATURE_STEP * i, 2)
                                            for i in range(1, round(TEMPERATURE_MAX / TEMPERATURE_STEP) + 1))
_TIE_EXTENSION = 4  # ship at most n_top * this many tokens to keep a tie from straddling the cut


def _grid_index(grid: Sequence[float], temperature: float) -> int | None:
    """Where ``temperature`` is in ``grid`` (None if absent): the summaries are per temperature."""
    for i, t in enumerate(grid):
        if abs(t - temperature) < 1e-9:
            return i
    return None


def _nearest(grid: Sequence[float], temperature: float) -> int:
    return min(range(len(grid)), key=lambda i: abs(grid[i] - temperature))


def temperature_grid(*extra: float) -> list[float]:
    """The slider's temperatures plus ``extra`` ones (those the explorer starts at), sorted."""
    grid = set(TEMPERATURE_GRID)
    for t in extra:
        if 0 < t and _grid_index(list(grid), t) is None:
            grid.add(float(t))
    return sorted(grid)


def _sig(x: float, digits: int = 10) -> float:
    return float(f"{x:.{digits}g}")


def encode_step(logits: torch.Tensor, n_top: int = 50, chosen: int | None = None,
                grid: Sequence[float] = TEMPERATURE_GRID) -> dict[str, Any]:
    """One step of the payload: the ``n_top`` largest logits and the summary of the rest at
    every temperature of ``grid`` (which must hold 1.0, for the model's own probabilities)."""
    if _grid_index(grid, 1.0) is None:
        raise ValueError("the temperature grid must include 1.0")
    values = logits.detach().float().cpu().reshape(-1).numpy()
    V = values.size
    order = np.lexsort((np.arange(V), -values.astype(np.float64)))  # by logit desc, then by id
    n = min(n_top, V)
    cap = min(V, max(n, n_top * _TIE_EXTENSION))
    while n < cap and values[order[n]] == values[order[n - 1]]:
        n += 1
    top = order[:n]
    step: dict[str, Any] = {"ids": top.tolist(), "logits": b64encode(values[top].astype("<f4")), "tail": None,
                            "chosen": None if chosen is None else int(chosen), "chosen_rank": None}
    if n < V:
        rest = values[order[n:]].astype(np.float64)
        z = rest[None, :] / np.asarray(grid, np.float64)[:, None]  # (grid, V - n)
        m = z.max(axis=1, keepdims=True)
        e = np.exp(z - m)
        s = e.sum(axis=1, keepdims=True)
        lse = (m + np.log(s))[:, 0]
        mean = ((e * z).sum(axis=1, keepdims=True) / s)[:, 0]
        step["tail"] = {"count": int(V - n), "max": float(rest[0]), "min": float(rest[-1]),
                        "temps": [float(t) for t in grid],
                        "lse": [_sig(x) for x in lse], "mean": [_sig(x) for x in mean]}
    if chosen is not None:
        step["chosen_rank"] = int(np.nonzero(order == int(chosen))[0][0])
    return step


@dataclass
class Filtered:
    """The distribution the widget shows for one step (see :func:`filtered_distribution`)."""

    ids: list[int]  # the shipped tokens, most likely first
    probs: np.ndarray  # their probability after temperature and filters
    kept: np.ndarray  # bool: survived the filters
    other: float  # probability of the V - n summarised tokens together (0 if none or removed)
    other_kept: bool
    exact: bool  # False when a filter cut through the summarised tokens (see module docstring)
    entropy: float  # nats, of the filtered distribution
    model_probs: np.ndarray  # the model's own probabilities (temperature 1, no filter)
    model_other: float


def _lse(values: Iterable[float]) -> float:
    v = np.fromiter(values, np.float64)
    if v.size == 0:
        return float("-inf")
    m = v.max()
    return float(m + np.log(np.exp(v - m).sum()))


def filtered_distribution(step: dict[str, Any], *, temperature: float = 1.0, top_k: int | None = 0,
                          top_p: float = 1.0, min_p: float = 0.0) -> Filtered:
    """What ``sampling.js`` computes, in Python: the filters of :mod:`minigpt.generate` applied to
    one step of the payload (``top_k`` 0 or None = off, ``top_p`` 1 = off, ``min_p`` 0 = off).

    Keep this and ``filterStep`` in sampling.js in step: the tests compare this function with
    ``next_token_probs`` and the browser's numbers with both.
    """
    ids = list(step["ids"])
    logit = b64decode(step["logits"], "<f4").astype(np.float64)
    N = logit.size
    tail = step.get("tail")
    k = int(top_k or 0)
    temps = tail["temps"] if tail else [1.0]
    g1 = _grid_index(temps, 1.0)
    z1_lse = _lse([*logit, *([tail["lse"][g1]] if tail else [])])
    model_probs = np.exp(logit - z1_lse)
    model_other = float(np.exp(tail["lse"][g1] - z1_lse)) if tail else 0.0

    probs = np.zeros(N)
    if temperature == 0:  # greedy: the argmax (lowest id among ties) gets everything
        probs[0] = 1.0
        kept = np.zeros(N, bool)
        kept[0] = True
        return Filtered(ids, probs, kept, 0.0, False, True, 0.0, model_probs, model_other)

    exact = True
    gi = _grid_index(temps, temperature)
    if gi is None:  # off the grid (never from the slider): the nearest summary, flagged
        gi = _nearest(temps, temperature)
        exact = tail is None
    z = logit / temperature
    n_keep = N  # the kept shipped tokens are always a prefix of the sorted list
    tail_kept = tail is not None
    tail_lse = tail["lse"][gi] if tail else float("-inf")
    t_max = tail["max"] / temperature if tail else float("-inf")
    t_min = tail["min"] / temperature if tail else float("-inf")

    def norm() -> float:
        return _lse([*z[:n_keep], *([tail_lse] if tail_kept else [])])

    if k > 0:
        total = N + (tail["count"] if tail else 0)
        kk = min(k, total)
        if kk <= N:
            kth = z[kk - 1]
            n_keep = int(np.sum(z >= kth))
            if tail_kept:
                if t_min >= kth:
                    pass  # every other token ties with the k-th: all kept
                elif t_max >= kth:
                    exact = False  # some kept: keep the block
                else:
                    tail_kept = False
        else:
            exact = False  # the k-th token is among the summarised ones
    if top_p < 1.0:
        Z = norm()
        before = 0.0
        new_keep = 0
        for i in range(n_keep):
            if before >= top_p:
                break
            new_keep = i + 1
            before += float(np.exp(z[i] - Z))
        n_keep = new_keep
        if tail_kept:
            if before >= top_p:
                tail_kept = False
            elif not (1.0 - float(np.exp(t_min - Z)) < top_p):
                exact = False  # the nucleus ends among the summarised tokens
    if min_p > 0.0:
        Z = norm()
        threshold = min_p * float(np.exp(z[0] - Z))
        n_keep = int(np.sum(np.exp(z[:n_keep] - Z) >= threshold))
        if tail_kept:
            if float(np.exp(t_max - Z)) < threshold:
                tail_kept = False
            elif float(np.exp(t_min - Z)) < threshold:
                exact = False
    Z = norm()
    probs[:n_keep] = np.exp(z[:n_keep] - Z)
    other = float(np.exp(tail_lse - Z)) if tail_kept else 0.0
    entropy = float(-np.sum(probs[:n_keep] * (z[:n_keep] - Z)))
    if tail_kept:
        entropy += other * (Z - tail["mean"][gi])
    kept = np.arange(N) < n_keep
    return Filtered(ids, probs, kept, other, tail_kept, exact, entropy, model_probs, model_other)


def _labels_for(tokenizer: Any, labels: Sequence[str] | None, ids: Iterable[int]) -> dict[str, str]:
    out = {}
    for i in ids:
        if labels is not None:
            out[str(i)] = str(labels[i])
        elif tokenizer is not None:
            out[str(i)] = token_label(tokenizer, i)
        else:
            out[str(i)] = str(i)
    return out


def _prompt_text(tokenizer: Any, prompt: Any, ids: list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(ids) if tokenizer is not None else "".join(f"[{i}]" for i in ids)


def _piece(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"[{token_id}]"
    if hasattr(tokenizer, "decode_bytes"):
        return tokenizer.decode_bytes([token_id]).decode("utf-8", errors="replace")
    return tokenizer.decode([token_id])


def trace_logits(model: GPT, ids: Sequence[int], max_new_tokens: int, *, seed: int = 0,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float = 1.0,
                 stop_tokens: Iterable[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Run :func:`minigpt.generate.generate` with a seeded generator and record, for every step,
    the logits the sampler saw ((steps, V), after the repetition penalty) and the token it drew.

    A forward hook on the model catches the logits of each step, so this is the real generation
    loop, not a re-implementation: the tokens are those ``generate`` gives for that seed.
    """
    device = model.transformer.wte.weight.device
    captured: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        captured.append(output[0][0, -1, :].detach().float().cpu().clone())

    handle = model.register_forward_hook(hook)
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        idx = torch.tensor([list(ids)], device=device)
        out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                       top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                       stop_tokens=stop_tokens, generator=gen)
    finally:
        handle.remove()
    new = out[0, len(ids):].tolist()
    logits = torch.stack(captured[:len(new)]) if new else torch.empty(0, model.config.vocab_size)
    if repetition_penalty != 1.0:
        seqs = [torch.tensor([list(ids) + new[:s]]) for s in range(len(new))]
        logits = torch.stack([apply_repetition_penalty(logits[s:s + 1], seqs[s], repetition_penalty)[0]
                              for s in range(len(new))])
    return logits, new


class SamplingExplorer(StaticHTMLWidget):
    """Bars of the next-token probabilities under temperature / top-k / top-p / min-p sliders,
    the kept set highlighted and its entropy shown; in trace mode, a seeded generation to step
    through token by token. Works live (anywidget) and in a static page.

    ``top_k`` 0 means off, ``top_p`` 1 means off, ``min_p`` 0 means off, ``temperature`` 0 is greedy.
    Build it with :meth:`from_model` (the next token after a prompt) or :meth:`trace`.
    """

    _esm = read_module("sampling.js")
    _widget_name = "sampling"
    _static_traits = ("temperature", "top_k", "top_p", "min_p", "step")

    temperature = traitlets.Float(1.0).tag(sync=True)
    top_k = traitlets.Int(0).tag(sync=True)
    top_p = traitlets.Float(1.0).tag(sync=True)
    min_p = traitlets.Float(0.0).tag(sync=True)
    step = traitlets.Int(0).tag(sync=True)

    def __init__(self, logits: torch.Tensor, tokenizer: Any = None, *, labels: Sequence[str] | None = None,
                 prompt: str = "", chosen: Sequence[int] | None = None, n_top: int = 50,
                 temperature: float = 1.0, top_k: int | None = 0, top_p: float | None = 1.0,
                 min_p: float | None = 0.0, step: int = 0, trace: dict[str, Any] | None = None,
                 title: str = "", **kwargs: Any) -> None:
        """``logits``: (V,) for one next token, or (steps, V) for a trace with ``chosen`` tokens."""
        logits = torch.as_tensor(logits).detach().float().cpu()
        if logits.dim() == 1:
            logits = logits[None]
        if logits.dim() != 2 or logits.size(0) == 0 or logits.size(1) == 0:
            raise ValueError(f"logits must be (V,) or (steps, V) with at least one step, got {tuple(logits.shape)}")
        if not torch.isfinite(logits).all():
            raise ValueError("logits must be finite (pass raw model outputs, before any filter)")
        if n_top < 1:
            raise ValueError(f"n_top={n_top} must be >= 1")
        S, V = logits.shape
        if chosen is not None and len(chosen) != S:
            raise ValueError(f"{len(chosen)} chosen tokens for {S} steps")
        if labels is not None and len(labels) != V:
            raise ValueError(f"{len(labels)} labels for a vocabulary of {V}")
        self._logits = logits
        self.vocab_size = V
        self.n_steps = S
        self.max_top_k = min(n_top, V)
        self.chosen = [int(c) for c in chosen] if chosen is not None else None
        self._temps = temperature_grid(temperature, *([trace["temperature"]] if trace else []))
        steps = [encode_step(logits[s], n_top, None if chosen is None else chosen[s], self._temps)
                 for s in range(S)]
        self._summarised = any(st["tail"] is not None for st in steps)
        self._steps = steps
        shown = {i for st in steps for i in st["ids"]} | set(self.chosen or [])
        payload = {
            "title": title, "V": V, "n_top": self.max_top_k,
            "labels": _labels_for(tokenizer, labels, sorted(shown)),
            "prompt": prompt[-400:], "prompt_cut": len(prompt) > 400,
            "pieces": [_piece(tokenizer, c) for c in self.chosen] if self.chosen is not None else None,
            "trace": trace, "steps": steps,
        }
        super().__init__(_data=payload, temperature=temperature, top_k=top_k or 0,
                         top_p=1.0 if top_p is None else top_p, min_p=min_p or 0.0, step=step, **kwargs)

    @classmethod
    def from_model(cls, model: GPT, tokenizer: TextTokenizer, prompt: str | Sequence[int],
                   **kwargs: Any) -> SamplingExplorer:
        """The distribution of the token after ``prompt`` (text, or token ids)."""
        ids = prompt_ids(model, tokenizer, prompt)
        device = model.transformer.wte.weight.device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids], device=device), last_only=True)
        finally:
            model.train(was_training)
        text = _prompt_text(tokenizer, prompt, ids)
        return cls(logits[0, -1], tokenizer, prompt=text, **kwargs)

    @classmethod
    def trace(cls, model: GPT, tokenizer: TextTokenizer, prompt: str | Sequence[int],
              max_new_tokens: int = 16, *, seed: int = 0, temperature: float = 1.0,
              top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
              repetition_penalty: float = 1.0, stop_tokens: Iterable[int] | None = None,
              n_top: int = 50, title: str = "") -> SamplingExplorer:
        """Generate ``max_new_tokens`` with ``minigpt.generate`` (seeded) and step through it: each
        step shows the distribution the token was drawn from and the token that was drawn. The
        sliders start at the trace's settings and can be moved to ask "what if"."""
        ids = prompt_ids(model, tokenizer, prompt)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 for a trace")
        settings = dict(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
                        min_p=min_p or 0.0)
        logits, new = trace_logits(model, ids, max_new_tokens, seed=seed, temperature=temperature,
                                   top_k=top_k, top_p=top_p, min_p=min_p,
                                   repetition_penalty=repetition_penalty, stop_tokens=stop_tokens)
        text = _prompt_text(tokenizer, prompt, ids)
        trace = {**settings, "seed": seed, "repetition_penalty": repetition_penalty}
        return cls(logits, tokenizer, prompt=text, chosen=new, n_top=n_top, trace=trace, title=title,
                   **settings)

    @property
    def logits(self) -> torch.Tensor:
        """The full logits of every step, (steps, V) float32 (after any repetition penalty)."""
        return self._logits

    def distribution(self, step: int | None = None) -> Filtered:
        """What the widget shows now (or at ``step``), computed in Python."""
        return filtered_distribution(self._steps[self.step if step is None else step],
                                     temperature=self.temperature, top_k=self.top_k,
                                     top_p=self.top_p, min_p=self.min_p)

    @traitlets.validate("temperature")
    def _check_temperature(self, proposal: dict[str, Any]) -> float:
        t = float(proposal["value"])
        if t == 0:
            return 0.0
        if not 0 < t <= TEMPERATURE_MAX:
            raise traitlets.TraitError(f"temperature={t} must be between 0 (greedy) and {TEMPERATURE_MAX}")
        i = _grid_index(self._temps, t)
        if i is not None:
            return self._temps[i]
        if self._summarised:  # the "other" block is summarised only at the grid's temperatures
            near = self._temps[_nearest(self._temps, t)]
            raise traitlets.TraitError(
                f"temperature={t} is not on the explorer's grid (0, and {TEMPERATURE_STEP} to "
                f"{TEMPERATURE_MAX} in steps of {TEMPERATURE_STEP}, plus the temperature it was built "
                f"with); use e.g. {near:g}, or build the explorer with temperature={t}")
        return t

    @traitlets.validate("top_k")
    def _check_top_k(self, proposal: dict[str, Any]) -> int:
        k = proposal["value"]
        if not 0 <= k <= self.max_top_k:
            raise traitlets.TraitError(f"top_k={k} must be between 0 (off) and {self.max_top_k}, the number "
                                       "of tokens the explorer ships (raise n_top to allow more)")
        return k

    @traitlets.validate("top_p")
    def _check_top_p(self, proposal: dict[str, Any]) -> float:
        p = float(proposal["value"])
        if not 0.0 < p <= 1.0:
            raise traitlets.TraitError(f"top_p={p} must be in (0, 1]; 1 means off")
        return p

    @traitlets.validate("min_p")
    def _check_min_p(self, proposal: dict[str, Any]) -> float:
        m = float(proposal["value"])
        if not 0.0 <= m <= 1.0:
            raise traitlets.TraitError(f"min_p={m} must be in [0, 1]; 0 means off")
        return m

    @traitlets.validate("step")
    def _check_step(self, proposal: dict[str, Any]) -> int:
        s = proposal["value"]
        if not 0 <= s < self.n_steps:
            raise traitlets.TraitError(f"step={s} is out of range: this explorer has {self.n_steps} "
                                       f"step(s), numbered 0..{self.n_steps - 1}")
        return s

    def __repr__(self) -> str:
        return (f"SamplingExplorer(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
                f"min_p={self.min_p}, step={self.step}/{self.n_steps}; vocabulary {self.vocab_size})")


def plot_sampling(logits: SamplingExplorer | torch.Tensor, tokenizer: Any = None, *,
                  labels: Sequence[str] | None = None, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                  step: int | None = None, n_top: int = 20, ax: Any = None) -> tuple[Any, Any]:
    """The matplotlib twin of :class:`SamplingExplorer`, for print: one bar per token of the top
    ``n_top`` (plus "other" when the vocabulary is larger), height = probability after the
    filters, kept tokens in colour and removed ones grey; a black tick marks the model's own
    probability (temperature 1, no filter). Settings default to the explorer's current ones
    (temperature 1, no filter for raw logits). Returns ``(fig, ax)``.
    """
    import matplotlib.pyplot as plt

    if isinstance(logits, SamplingExplorer):
        w = logits
        settings = dict(temperature=w.temperature, top_k=w.top_k, top_p=w.top_p, min_p=w.min_p)
        row = w.logits[w.step if step is None else step]
        names = w._data["labels"]

        def label_of(i: int) -> str:
            return names.get(str(i)) or (token_label(tokenizer, i) if tokenizer is not None else str(i))
    else:
        settings = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
        row = torch.as_tensor(logits).detach().float().reshape(-1, torch.as_tensor(logits).shape[-1])
        row = row[0 if step is None else step]

        def label_of(i: int) -> str:
            if labels is not None:
                return str(labels[i])
            return token_label(tokenizer, i) if tokenizer is not None else str(i)
    for name, value in dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p).items():
        if value is not None:
            settings[name] = value
    settings["top_k"] = settings["top_k"] or 0
    f = filtered_distribution(encode_step(row, n_top, grid=temperature_grid(settings["temperature"])), **settings)
    n = len(f.ids)
    heights = [*f.probs.tolist(), *([f.other] if f.model_other > 0 else [])]
    names_ = [label_of(i) for i in f.ids] + (["other"] if f.model_other > 0 else [])
    kept = [*f.kept.tolist(), *([f.other_kept] if f.model_other > 0 else [])]
    model_p = [*f.model_probs.tolist(), *([f.model_other] if f.model_other > 0 else [])]
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(heights) + 1.5), 3.6))
    else:
        fig = ax.figure
    colors = ["tab:blue" if k else "lightgray" for k in kept]
    ax.bar(range(len(heights)), heights, color=colors, edgecolor="none")
    ax.scatter(range(len(heights)), model_p, marker="_", s=120, color="black", zorder=3,
               label="model (T=1, no filter)")
    ax.set_xticks(range(len(heights)), names_, rotation=90, fontsize=8)
    ax.set_ylabel("probability")
    ax.set_ylim(0, max(1e-9, *heights, *model_p) * 1.08)
    kept_count = sum(kept[:n])
    knobs = (f"T={settings['temperature']:g}" + (f", top-k={settings['top_k']}" if settings["top_k"] else "")
             + (f", top-p={settings['top_p']:g}" if settings["top_p"] < 1 else "")
             + (f", min-p={settings['min_p']:g}" if settings["min_p"] > 0 else ""))
    approx = "" if f.exact else " (≈)"
    ax.set_title(f"{knobs}: {kept_count} of {n} kept, entropy {f.entropy:.3f} nats{approx}", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig, ax
