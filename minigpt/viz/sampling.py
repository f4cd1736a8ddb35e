"""Sampling explorer: how temperature, top-k, top-p and min-p reshape the next-token distribution.

Python ships each step's whole logits row (float32, base64: 4 bytes a token, about 11 KB for a
2,048-token vocabulary, 268 KB for GPT-2's 50,257) and ``sampling.js`` applies the filters
in the browser to all of it, as :func:`minigpt.generate.next_token_probs` does and in the same
order (temperature, top-k with ties kept, top-p keeping the most likely token and the smallest
set whose mass is >= p, min-p relative to the top probability; temperature 0 is greedy). So the
numbers shown are the sampler's at any setting; the browser tests check them against
``next_token_probs``, which :meth:`SamplingExplorer.distribution` and :func:`plot_sampling`
call on the same rows. The repetition penalty is not a slider: a trace made with one records the
logits *after* the penalty, so the JavaScript starts from the same numbers the sampler saw.

Ties: the tokens are ranked by logit, then by id. When top-p must choose between tied tokens,
the widget keeps the lower id; ``torch.sort`` leaves that order unspecified.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import traitlets

from minigpt.generate import apply_repetition_penalty, generate, next_token_probs, top_k_filter
from minigpt.model import GPT, evaluating
from minigpt.viz._common import TextTokenizer, b64encode, prompt_ids, token_label
from minigpt.viz._widget import StaticHTMLWidget, read_module

TEMPERATURE_MAX = 2.0
# The largest vocabulary the explorer ships whole rows of: GPT-2's 50,257 tokens are 268 KB a step.
MAX_VOCAB = 65_536


def _probs(row: torch.Tensor, *, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The (V,) distribution ``sampling.js`` shows for one logits row at the widget's settings
    (``top_k`` 0 = off): :func:`~minigpt.generate.next_token_probs`, so Python and the page read the same filters."""
    return next_token_probs(row[None], temperature=temperature, top_k=top_k or None, top_p=top_p,
                            min_p=min_p)[0]


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
        """``logits``: (V,) for one next token, or (steps, V) for a trace with ``chosen`` tokens.

        The ``n_top`` most likely tokens of a step get a bar each (the rest share one "other" bar),
        and top-k goes up to ``n_top``. Every row is shipped whole, so V is at most :data:`MAX_VOCAB`.
        """
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
        if V > MAX_VOCAB:
            raise ValueError(f"a vocabulary of {V:,} tokens is more than the {MAX_VOCAB:,} the explorer ships "
                             "whole rows of (4 bytes a token a step)")
        if chosen is not None and len(chosen) != S:
            raise ValueError(f"{len(chosen)} chosen tokens for {S} steps")
        if labels is not None and len(labels) != V:
            raise ValueError(f"{len(labels)} labels for a vocabulary of {V}")
        self._logits = logits
        self.vocab_size = V
        self.n_steps = S
        self.max_top_k = min(n_top, V)
        self.chosen = [int(c) for c in chosen] if chosen is not None else None
        steps = [{"logits": b64encode(row.numpy().astype("<f4")),
                  "chosen": None if self.chosen is None else self.chosen[s]} for s, row in enumerate(logits)]
        # Labels only for the tokens that get a bar: the n_top most likely of some step, ties
        # included (whichever of them the page ranks first), and the drawn ones.
        barred = torch.isfinite(top_k_filter(logits, self.max_top_k)).nonzero()[:, 1].tolist()
        payload = {
            "title": title, "n_top": self.max_top_k,
            "labels": _labels_for(tokenizer, labels, sorted({*barred, *(self.chosen or [])})),
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
        with evaluating(model), torch.no_grad():
            logits, _ = model(torch.tensor([ids], device=device), last_only=True)
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

    def distribution(self, step: int | None = None) -> torch.Tensor:
        """The (V,) probabilities the widget shows now (or at ``step``): :func:`~minigpt.generate.next_token_probs`
        on the very row the page was sent (:attr:`logits` holds it bit for bit)."""
        return _probs(self._logits[self.step if step is None else step], temperature=self.temperature,
                      top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)

    @traitlets.validate("temperature")
    def _check_temperature(self, proposal: dict[str, Any]) -> float:
        t = float(proposal["value"])
        if t == 0:
            return 0.0
        if not 0 < t <= TEMPERATURE_MAX:
            raise traitlets.TraitError(f"temperature={t} must be between 0 (greedy) and {TEMPERATURE_MAX}")
        return t

    @traitlets.validate("top_k")
    def _check_top_k(self, proposal: dict[str, Any]) -> int:
        k = proposal["value"]
        if not 0 <= k <= self.max_top_k:
            raise traitlets.TraitError(f"top_k={k} must be between 0 (off) and {self.max_top_k}, the number "
                                       "of tokens with a bar of their own (raise n_top to allow more)")
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
    probs = _probs(row, **settings).double()
    own = row.double().softmax(-1)
    order = torch.sort(row, descending=True, stable=True).indices  # by logit, then by id, as the page
    ids, rest = order[:n_top], order[n_top:]
    heights = [*probs[ids].tolist(), *([float(probs[rest].sum())] if len(rest) else [])]
    names_ = [label_of(i) for i in ids.tolist()] + (["other"] if len(rest) else [])
    kept = [*(probs[ids] > 0).tolist(), *([bool((probs[rest] > 0).any())] if len(rest) else [])]
    model_p = [*own[ids].tolist(), *([float(own[rest].sum())] if len(rest) else [])]
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
    p = probs[probs > 0]
    entropy = float(-(p * p.log()).sum())
    knobs = (f"T={settings['temperature']:g}" + (f", top-k={settings['top_k']}" if settings["top_k"] else "")
             + (f", top-p={settings['top_p']:g}" if settings["top_p"] < 1 else "")
             + (f", min-p={settings['min_p']:g}" if settings["min_p"] > 0 else ""))
    ax.set_title(f"{knobs}: {len(p)} of {len(row)} kept, entropy {entropy:.3f} nats", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig, ax
