"""Attention view: which earlier tokens each token reads from, per layer and head.

Python runs the model once (``GPT.forward(..., return_attention=True)``) and ships every layer's
attention probabilities, quantised to 16 (or 8) bits and base64-encoded, to ``attention.js``. Only
the lower triangle is sent: the causal mask makes the rest zero, and the view draws it hatched,
so "a token never looks ahead" is visible at a glance. Layer and head are chosen in the browser,
with no kernel round trip; ``layer``/``head`` are synced back to Python when there is a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import traitlets

from minigpt.model import GPT, evaluating
from minigpt.viz._common import TextTokenizer, b64decode, b64encode, prompt_ids, token_label
from minigpt.viz._widget import StaticHTMLWidget, read_module


def attention_maps(model: GPT, ids: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention probabilities for one sequence: a list of (H, T, T) CPU tensors.

    The model runs in eval mode (no dropout) and is put back in the mode it was in.
    """
    ids = prompt_ids(model, None, ids)
    device = model.transformer.wte.weight.device
    with evaluating(model), torch.no_grad():
        _, _, atts = model(torch.tensor([ids], device=device), return_attention=True)
    return [a[0].float().cpu() for a in atts]


def _as_array(attentions: Sequence[torch.Tensor | np.ndarray] | np.ndarray) -> np.ndarray:
    """Stack per-layer (H, T, T) or (1, H, T, T) maps into one (L, H, T, T) float32 array."""
    layers = [a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float32)
              for a in attentions]
    if not layers:
        raise ValueError("attentions is empty: give one (H, T, T) tensor per layer")
    layers = [a[0] if a.ndim == 4 and a.shape[0] == 1 else a for a in layers]
    shapes = {a.shape for a in layers}
    if len(shapes) != 1:
        raise ValueError(f"every layer's attention must have the same shape, got {sorted(shapes)}")
    shape = layers[0].shape
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"each layer's attention must be (n_head, T, T) (or (1, n_head, T, T)), got {shape}")
    return np.stack(layers).astype(np.float32)


def encode_attention(attentions: Sequence[torch.Tensor] | np.ndarray, tokens: Sequence[str], *,
                     bits: int = 16, title: str = "") -> dict[str, Any]:
    """The payload ``attention.js`` reads.

    ``weights`` holds ``round(p * (2**bits - 1))`` for the lower triangle only, in the order layer,
    head, query row, key column (column <= row), as little-endian uint16 (or uint8) in base64.
    The error is at most ``0.5 / (2**bits - 1)``: 7.6e-6 for 16 bits, 2e-3 for 8 bits.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits={bits} must be 8 or 16")
    att = _as_array(attentions)
    n_layer, n_head, T, _ = att.shape
    if len(tokens) != T:
        raise ValueError(f"{len(tokens)} token labels for attention over {T} positions")
    rows, cols = np.tril_indices(T)
    scale = 2**bits - 1
    q = np.rint(np.clip(att[:, :, rows, cols], 0.0, 1.0) * scale)
    q = q.astype("<u2" if bits == 16 else "u1")
    return {"tokens": [str(t) for t in tokens], "n_layer": n_layer, "n_head": n_head, "T": T,
            "bits": bits, "weights": b64encode(q), "title": title}


def decode_attention(payload: dict[str, Any]) -> np.ndarray:
    """Invert :func:`encode_attention`: (L, H, T, T) float32 with zeros above the diagonal."""
    n_layer, n_head, T, bits = payload["n_layer"], payload["n_head"], payload["T"], payload["bits"]
    q = b64decode(payload["weights"], "<u2" if bits == 16 else "u1").astype(np.float32) / (2**bits - 1)
    rows, cols = np.tril_indices(T)
    out = np.zeros((n_layer, n_head, T, T), np.float32)
    out[:, :, rows, cols] = q.reshape(n_layer, n_head, -1)
    return out


MAX_TOKENS = 256  # a T x T heatmap of SVG cells: 33k cells at 256 tokens is still quick to draw


class AttentionView(StaticHTMLWidget):
    """Heatmap of one head's attention (query rows, key columns) plus thumbnails of every head of
    the layer; pick layer and head in the page. Works live (anywidget) and in a static page.

    Build it from a model with :meth:`from_model`, or from maps you already have:
    ``AttentionView(attentions, tokens)`` with one (H, T, T) tensor per layer and T labels.
    """

    _esm = read_module("attention.js")
    _widget_name = "attention"
    _static_traits = ("layer", "head")

    layer = traitlets.Int(0).tag(sync=True)
    head = traitlets.Int(0).tag(sync=True)

    def __init__(self, attentions: Sequence[torch.Tensor] | np.ndarray, tokens: Sequence[str], *,
                 layer: int = 0, head: int = 0, bits: int = 16, title: str = "", **kwargs: Any) -> None:
        self._attention = _as_array(attentions)
        self.n_layer, self.n_head, self.T = self._attention.shape[:3]
        if self.T > MAX_TOKENS:
            raise ValueError(f"{self.T} tokens is too many to draw as a heatmap (at most {MAX_TOKENS}); "
                             "show a shorter prompt, or plot_attention() for print")
        self.tokens = [str(t) for t in tokens]
        payload = encode_attention(self._attention, self.tokens, bits=bits, title=title)
        super().__init__(_data=payload, layer=layer, head=head, **kwargs)

    @classmethod
    def from_model(cls, model: GPT, tokenizer: TextTokenizer, prompt: str | Sequence[int],
                   **kwargs: Any) -> AttentionView:
        """Run ``model`` on ``prompt`` (text, or token ids) and show its attention."""
        ids = prompt_ids(model, tokenizer, prompt)
        labels = [token_label(tokenizer, i) for i in ids]
        return cls(attention_maps(model, ids), labels, **kwargs)

    @property
    def attention(self) -> np.ndarray:
        """The maps shown, (n_layer, n_head, T, T) float32 (before quantisation)."""
        return self._attention

    @traitlets.validate("layer")
    def _check_layer(self, proposal: dict[str, Any]) -> int:
        value = proposal["value"]
        if not 0 <= value < self.n_layer:
            raise traitlets.TraitError(f"layer={value} is out of range: this model has {self.n_layer} "
                                       f"layers, numbered 0..{self.n_layer - 1}")
        return value

    @traitlets.validate("head")
    def _check_head(self, proposal: dict[str, Any]) -> int:
        value = proposal["value"]
        if not 0 <= value < self.n_head:
            raise traitlets.TraitError(f"head={value} is out of range: each layer has {self.n_head} "
                                       f"heads, numbered 0..{self.n_head - 1}")
        return value

    def __repr__(self) -> str:
        return (f"AttentionView(layer={self.layer}, head={self.head}; {self.n_layer} layers x "
                f"{self.n_head} heads over {self.T} tokens)")


def plot_attention(attentions: AttentionView | Sequence[torch.Tensor] | np.ndarray,
                   tokens: Sequence[str] | None = None, *, layer: int = 0, head: int | None = None,
                   ax: Any = None, ncols: int = 4, max_labels: int = 40) -> tuple[Any, Any]:
    """The matplotlib twin of :class:`AttentionView`, for print.

    ``head=None`` draws every head of ``layer`` in a grid and returns ``(fig, axes)`` with one
    axes per head; an int draws that head alone and returns ``(fig, ax)``. The causal upper
    triangle is left blank. Token labels are drawn when there are at most ``max_labels``.
    """
    import matplotlib.pyplot as plt

    if isinstance(attentions, AttentionView):
        tokens = attentions.tokens if tokens is None else tokens
        att = attentions.attention
    else:
        att = _as_array(attentions)
    n_layer, n_head, T, _ = att.shape
    if not 0 <= layer < n_layer:
        raise ValueError(f"layer={layer} is out of range 0..{n_layer - 1}")
    if head is not None and not 0 <= head < n_head:
        raise ValueError(f"head={head} is out of range 0..{n_head - 1}")
    labels = list(tokens) if tokens is not None else [str(i) for i in range(T)]
    # The masked upper triangle is drawn blank ("not allowed"), not as zero attention.
    cmap = plt.get_cmap("Blues").with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    upper = np.triu(np.ones((T, T), bool), k=1)

    def draw(a: Any, h: int, small: bool) -> Any:
        img = a.imshow(np.ma.masked_array(att[layer, h], upper), cmap=cmap, vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        a.set_title(f"layer {layer}, head {h}", fontsize=9 if small else 11)
        if T <= max_labels and not small:
            a.set_xticks(range(T), labels, rotation=90, fontsize=8)
            a.set_yticks(range(T), labels, fontsize=8)
            a.set_xlabel("key (attended to)")
            a.set_ylabel("query (attending)")
        else:
            a.set_xticks([])
            a.set_yticks([])
        return img

    if head is not None:
        if ax is None:
            size = min(10.0, 3.0 + 0.22 * T)
            fig, ax = plt.subplots(figsize=(size, size))
        else:
            fig = ax.figure
        img = draw(ax, head, small=False)
        fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
        return fig, ax

    ncols = max(1, min(ncols, n_head))
    nrows = -(-n_head // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * nrows), squeeze=False)
    axes = grid.ravel()
    for extra in axes[n_head:]:
        fig.delaxes(extra)
    for h in range(n_head):
        draw(axes[h], h, small=True)
    fig.suptitle(f"layer {layer}: every head (rows attend to columns; upper triangle masked)", fontsize=11)
    return fig, axes[:n_head]
