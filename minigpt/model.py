"""The GPT-2 architecture, small enough to read in one sitting and exact enough to load GPT-2.

Layout follows OpenAI's GPT-2 (and Hugging Face's ``GPT2LMHeadModel``): token + position
embeddings, ``n_layer`` pre-LayerNorm blocks (causal self-attention, then a GELU MLP), a final
LayerNorm and an output head that shares its weight with the token embedding. Parameter names
mirror Hugging Face's (``transformer.h.0.attn.c_attn`` ...) so converting a checkpoint is a
rename-free transpose.

Four switches of :class:`GPTConfig` turn the block into a Llama-style one, one piece at a time
(chapter 9): ``norm="rmsnorm"``, ``mlp="swiglu"``, ``position="rope"`` and ``n_kv_head`` for
grouped-query attention. Their defaults are GPT-2's, so a default model, its parameter names and
its checkpoints are exactly what they were before the switches existed.

A fifth switch, ``causal=False``, removes the causal mask: every position then attends to the
whole input, as in an encoder such as BERT (chapter 0 trains one with a masked-language-model
objective). Such a model has no next token to predict, so it refuses a KV cache and generation.

The key/value cache used for fast generation lives here too (:class:`KVCache`): the attention
module is its only reader and writer, so its tensor layout is an attention detail, while
:mod:`minigpt.generate` only decides how big to make it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.data import hub_failures, require_hub

if TYPE_CHECKING:
    from minigpt.recipe import Recipe

AttnImpl = Literal["sdpa", "naive"]
Norm = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "swiglu"]
Position = Literal["learned", "rope"]
NORM_EPS = 1e-5  # GPT-2's LayerNorm epsilon; Llama 2 uses the same for its RMSNorm
#: SwiGLU's hidden width is rounded to a multiple of this.
SWIGLU_MULTIPLE = 8

# name -> (n_layer, n_head, n_embd) of the four released GPT-2 models.
GPT2_SIZES: dict[str, tuple[int, int, int]] = {
    "124M": (12, 12, 768),
    "355M": (24, 16, 1024),
    "774M": (36, 20, 1280),
    "1558M": (48, 25, 1600),
}
GPT2_HF_NAMES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


@dataclass
class GPTConfig:
    """Every shape of the model. ``vocab_size`` 50304 is GPT-2's 50257 padded to a multiple of
    64, which makes the output matmul faster on GPUs; use 50257 to load OpenAI's weights."""

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attn_impl: AttnImpl = "sdpa"
    # The modern-block switches (chapter 9); each default is GPT-2's.
    norm: Norm = "layernorm"  # "rmsnorm": scale by the root mean square, no centring, no bias
    mlp: MLPKind = "gelu"  # "swiglu": a gated MLP, hidden width 2/3 of 4 * n_embd (see mlp_hidden)
    position: Position = "learned"  # "rope": rotate queries and keys instead of adding wpe
    n_kv_head: int | None = None  # grouped-query attention: heads of keys/values; None = n_head
    rope_theta: float = 10000.0  # RoPE's base: the slowest pair turns once per ~theta positions
    # False: bidirectional attention, no causal mask (an encoder, as BERT's; chapter 0). Such a
    # model sees the whole input, so it cannot generate: no KV cache, no next-token logits.
    causal: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            ok = [h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0 and h <= 64]
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick n_head from "
                f"the divisors of n_embd (e.g. {ok[-4:]}) or change n_embd to a multiple of {self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.attn_impl not in ("sdpa", "naive"):
            raise ValueError(f"attn_impl={self.attn_impl!r} must be 'sdpa' or 'naive'")
        for name, choices in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")),
                              ("position", ("learned", "rope"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {', '.join(map(repr, choices))}")
        if self.n_kv_head is not None:
            ok = [g for g in range(1, self.n_head + 1) if self.n_head % g == 0]
            if (not isinstance(self.n_kv_head, int) or isinstance(self.n_kv_head, bool)
                    or self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
                raise ValueError(f"n_kv_head={self.n_kv_head!r} must divide n_head={self.n_head} (each group of "
                                 f"query heads shares one key/value head); choose one of {ok}, or None for n_head")
        if self.position == "rope":
            if self.head_dim % 2:
                raise ValueError(f"RoPE rotates pairs of features, but head_dim = n_embd / n_head = {self.head_dim} "
                                 "is odd; pick n_embd and n_head with an even quotient")
            if not self.rope_theta > 1:
                raise ValueError(f"rope_theta={self.rope_theta} must be > 1 (10000 is the usual base)")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal={self.causal!r} must be True (a decoder, GPT) or False (an encoder, BERT)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or ``n_head`` when it is None (no grouping)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: GPT-2's 4 * n_embd, or for SwiGLU (three matrices instead of
        two) 2/3 of that rounded to a multiple of :data:`SWIGLU_MULTIPLE`, which keeps the MLP's
        parameters (and FLOPs) within a few percent of GPT-2's, as in the PaLM and Llama papers."""
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return max(SWIGLU_MULTIPLE, SWIGLU_MULTIPLE * round(2 * 4 * self.n_embd / 3 / SWIGLU_MULTIPLE))

    @property
    def is_gpt2(self) -> bool:
        """True for GPT-2's own block (every switch at its default): what GPT-2 weights fit."""
        return (self.norm == "layernorm" and self.mlp == "gelu" and self.position == "learned"
                and self.kv_heads == self.n_head and self.causal)

    @classmethod
    def from_recipe(cls, recipe: Recipe, vocab_size: int, **overrides: Any) -> GPTConfig:
        """The model shape of a :class:`~minigpt.recipe.Recipe` with a tokenizer's vocabulary size."""
        return cls(vocab_size=vocab_size, **{**dataclasses.asdict(recipe.model), **overrides})

    @classmethod
    def gpt2(cls, size: str = "124M", **overrides: Any) -> GPTConfig:
        """A released GPT-2 shape (``"124M"``, ``"355M"``, ``"774M"``, ``"1558M"``, or the Hugging
        Face names ``"gpt2"``, ``"gpt2-medium"`` ...) with its 50257-token vocabulary."""
        size = GPT2_HF_NAMES.get(size, size)
        if size not in GPT2_SIZES:
            raise ValueError(f"unknown GPT-2 size {size!r}; choose one of {', '.join(GPT2_SIZES)}")
        n_layer, n_head, n_embd = GPT2_SIZES[size]
        base = dict(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf_config(cls, hf_config: Any, **overrides: Any) -> GPTConfig:
        """Translate a ``transformers.GPT2Config``, refusing the options of that class this model does
        not have (it would load the weights and compute something else)."""
        differs = {name: value for name, want in (
            ("activation_function", "gelu_new"), ("layer_norm_epsilon", 1e-5), ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False)) if (value := getattr(hf_config, name, want)) != want}
        if differs:
            raise ValueError(f"this GPT-2 config sets {differs}, which minigpt's GPT does not implement (it has "
                             "tanh GELU, LayerNorm eps 1e-5 and 1/sqrt(head size) attention scaling)")
        base = dict(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                    n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd)
        return cls(**{**base, **overrides})


class KVCache:
    """Preallocated keys and values of every layer: ``k``/``v`` have shape
    (n_layer, batch, n_kv_head, max_len, head_dim); with grouped-query attention that is
    ``n_head / n_kv_head`` times smaller than one entry per query head.

    ``length`` counts the positions already written; it is also the position offset of the next
    tokens fed to the model. Preallocating (instead of ``torch.cat`` each step) keeps memory
    flat and avoids a copy of the whole cache per generated token.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        #: (batch, max_len) True where a cached position holds a real token, not left padding;
        #: None while every position is real (no ``attention_mask`` was given).
        self.real: torch.Tensor | None = None
        #: One object per row that a model whose positions are computed from its tokens carries from
        #: call to call (:class:`minigpt.reasoning.CoupledGPT`); None for every other model.
        self.row_state: list[Any] | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (B, H, T, D) after the cached ones; return all of them.

        ``length`` is advanced by the model once every layer has written (see ``GPT.forward``).
        """
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.length = 0
        self.real = None
        self.row_state = None

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row ``rows[i]`` of the batch as row i (beam search: each beam continues one of the
        previous step's beams, possibly the same one twice)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        if self.real is not None:
            self.real = self.real[rows]
        if self.row_state is not None:  # copies: a beam kept twice goes on as two rows
            self.row_state = [copy.copy(self.row_state[i]) for i in rows.tolist()]


@dataclass(frozen=True)
class Padding:
    """What attention needs to serve a left-padded batch (prompts of different lengths in one
    batch, the shorter ones preceded by pad tokens): every token's position among its row's real
    tokens, so a prompt reads the same position embeddings (or rotations) whatever its padding,
    and which keys each query may see. Built by :meth:`GPT.forward` from ``attention_mask``."""

    positions: torch.Tensor  #: (B, T) long
    #: (B, 1, T, T_key) bool: causal, and never a pad key (but its own); None: plain causal
    #: attention (positions given to :meth:`GPT.forward` for a batch without padding)
    allowed: torch.Tensor | None

    @classmethod
    def of(cls, real: torch.Tensor, t_query: int) -> Padding:
        """From ``real`` (B, T_key), True at real tokens, of which the last ``t_query`` are the
        queries. A pad query may see itself only (a row with no key would be NaN): its output is
        never read, because no real token attends to it."""
        t_key = real.size(1)
        positions = (real.long().cumsum(1) - 1).clamp(min=0)[:, t_key - t_query:]
        keys = torch.arange(t_key, device=real.device)
        itself = keys[None, :] == keys[t_key - t_query:, None]
        allowed = causal_mask(t_query, t_key, real.device) & (real[:, None, :] | itself)
        return cls(positions, allowed[:, None])


def causal_mask(t_query: int, t_key: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (t_query, t_key) mask, True where attention is allowed.

    The queries are the *last* ``t_query`` of ``t_key`` positions (with a KV cache the keys
    include earlier tokens), so query i may see keys up to ``t_key - t_query + i``.
    """
    return torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril(diagonal=t_key - t_query)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each ``(*positions.shape, head_dim / 2)`` in float32, of the RoPE angles
    ``p * theta^(-2i / head_dim)`` for every position p and feature pair i: pair 0 turns by one
    radian per position, the last pair slowest. Computed on the fly (a few thousand numbers), so a
    cast of the model to bf16 never rounds them."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (x_i, x_{i + D/2}) of ``x`` (..., T, D) by the angles of
    :func:`rope_cos_sin`: the half-split layout of GPT-NeoX and Hugging Face's Llama. A rotation
    keeps each vector's norm, and the dot product of two rotated vectors depends only on how far
    apart their positions are."""
    x1, x2 = x.to(torch.float32).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


#: Why a bidirectional model (``causal=False``) refuses a KV cache, padding and generation.
NOT_CAUSAL = ("this model is bidirectional (causal=False, an encoder like BERT): every position sees the whole "
              "input, so it has no next token to generate, and appending a token would change every position's "
              "keys, which a KV cache assumes fixed; generate with a causal model (causal=True)")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; ``c_attn`` makes q, k, v in one matmul.

    With ``causal=False`` the mask is dropped and every position attends to every other one
    (bidirectional, as in an encoder); the weights and their names are the same.

    With ``n_kv_head < n_head`` (grouped-query attention) ``c_attn`` makes fewer key/value heads
    and each is shared by ``n_head / n_kv_head`` consecutive query heads; with ``position="rope"``
    queries and keys are rotated by their position before the scores (keys before they are cached).
    """

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl
        self.causal = config.causal
        self.rope_theta = config.rope_theta if config.position == "rope" else None
        self.layer_idx = layer_idx  # which slice of a shared KVCache is ours
        kv_width = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # Prefix tuning (minigpt.peft.PrefixKV): learned keys and values that every query sees
        # before the tokens' own; None in a plain model.
        self.prefix: nn.Module | None = None

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, need_weights: bool = False,
                padding: Padding | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the attention output (B, T, C) and, if ``need_weights``, the attention
        probabilities (B, H, T, T_key) computed by the naive path. ``padding``: a left-padded
        batch's positions and mask (see :class:`Padding`)."""
        if not self.causal and (kv_cache is not None or padding is not None):
            raise ValueError(NOT_CAUSAL)
        B, T, C = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([C, G * D, G * D], dim=2)
        # (B, T, C) -> (B, H, T, D): every head attends independently.
        q = q.view(B, T, H, D).transpose(1, 2)
        k, v = (t.view(B, T, G, D).transpose(1, 2) for t in (k, v))
        if self.rope_theta is not None:  # rotate by absolute position; the cache holds rotated keys
            if padding is not None:  # (B, 1, T): each row's own positions, shared by its heads
                positions = padding.positions[:, None]
            else:
                start = kv_cache.length if kv_cache is not None else 0
                positions = torch.arange(start, start + T, device=x.device)
            cos, sin = rope_cos_sin(positions, D, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op unless the cache dtype differs
        if G != H:  # each key/value head serves H / G consecutive query heads
            k, v = (t.repeat_interleave(H // G, dim=1) for t in (k, v))
        allowed = padding.allowed if padding is not None else None
        if self.prefix is not None:  # kept out of the cache: prepended at every call
            k, v, allowed = self.prefix(k, v, allowed, T, self.causal)
        if need_weights or self.attn_impl == "naive":
            y, att = self._naive(q, k, v, allowed)
        else:
            y, att = self._sdpa(q, k, v, allowed), None
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-join the heads
        return self.resid_dropout(self.c_proj(y)), (att if need_weights else None)

    def _naive(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax(q k^T / sqrt(d) + mask) v, spelled out: the reference for the fast path.
        ``allowed`` replaces the causal mask (a padded batch's, see :class:`Padding`); a
        bidirectional model (``causal=False``) masks nothing."""
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        if allowed is None and self.causal:
            allowed = causal_mask(q.size(2), k.size(2), q.device)
        if allowed is not None:
            att = att.masked_fill(~allowed, float("-inf"))
        att = F.softmax(att, dim=-1)
        return self.attn_dropout(att) @ v, att

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              allowed: torch.Tensor | None = None) -> torch.Tensor:
        """PyTorch's fused attention (flash / memory-efficient kernels on GPUs)."""
        dropout_p = self.dropout if self.training else 0.0
        if not self.causal:  # bidirectional: every query sees every key
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=False)
        if allowed is not None:  # a padded batch: its own mask (flash takes none; another kernel runs)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        t_query, t_key = q.size(2), k.size(2)
        if t_query == t_key:  # no cache, or the prefill: plain causal attention
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        if t_query == 1:  # decoding one token: it may see every cached position
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        # Several new tokens after a cache: is_causal would align the mask top-left, so be explicit.
        mask = causal_mask(t_query, t_key, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU (GPT-2's tanh approximation), project back.

    With ``mlp="swiglu"`` (Shazeer 2020; PaLM, Llama) ``c_fc`` makes two vectors of width
    ``config.mlp_hidden``, a gate and a value, and the hidden state is ``silu(gate) * value``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_hidden
        self.swiglu = config.mlp == "swiglu"
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.act = nn.SiLU() if self.swiglu else nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = self.act(gate) * value
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))


def make_norm(config: GPTConfig) -> nn.Module:
    """GPT-2's LayerNorm, or RMSNorm (Zhang and Sennrich 2019): ``x / rms(x) * weight``, no mean
    subtracted and no bias, one reduction instead of two."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=NORM_EPS)
    return nn.LayerNorm(config.n_embd, eps=NORM_EPS, bias=config.bias)


class Block(nn.Module):
    """Pre-LN transformer block: each sublayer reads a normalised copy of the residual stream
    and adds its result back, so the stream itself is never normalised."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, need_weights: bool = False,
                padding: Padding | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, att = self.attn(self.ln_1(x), kv_cache, need_weights, padding)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, att


class GPT(nn.Module):
    """GPT-2: ``forward(idx, targets)`` returns ``(logits, loss)``. With ``position="rope"`` it
    has no ``transformer.wpe``: positions enter through the rotation inside attention."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        modules: dict[str, nn.Module] = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                       ln_f=make_norm(config))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: reading a token and predicting it use the same vector (saves V*C params).
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer):
        # 2 * n_layer of them add up, and this keeps the stream's variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, last_only: bool = False,
                return_attention: bool = False, prefix: torch.Tensor | None = None,
                logits: bool = True, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> tuple[Any, ...]:
        """Next-token logits for every position of ``idx`` (B, T).

        * ``targets``: (B, T) next tokens; positions set to -100 are left out of the mean loss.
        * ``kv_cache``: keys/values of earlier positions; ``idx`` continues at ``kv_cache.length``.
        * ``last_only``: compute logits for the last position only, (B, 1, V): all that sampling needs.
        * ``return_attention``: also return a list with each layer's (B, H, T, T_key) attention
          probabilities (this call then runs the naive attention path).
        * ``prefix``: (B, P, n_embd) input vectors read before ``idx``, as if they were token
          embeddings (image patches in chapter 11). They take the first P positions (and cache
          entries) but get no logits: logits and ``targets`` cover ``idx`` only.
        * ``attention_mask``: (B, T), 1 at real tokens and 0 at left padding, for a batch of
          prompts of different lengths (as in Hugging Face). Each row then reads positions from 0
          at its first real token and no token attends to padding, so a row's logits are those it
          would have alone. With ``kv_cache`` the cache keeps the mask: later calls may omit it.
        * ``positions``: (B, T) the position of each token of ``idx`` (its RoPE angle or ``wpe``
          row) in place of its place in the sequence, as Hugging Face's ``position_ids``: tokens
          that belong together can share positions (position coupling, chapter 14). With
          ``kv_cache``, the positions of the new tokens.
        * ``logits=False`` (with ``targets``): run the output head only at the positions whose
          target counts and return ``(None, loss)``, the same loss for less work where most targets
          are -100 (SFT's prompts). The selection's shape depends on the data: eager mode only.

        A bidirectional model (``config.causal=False``) returns at every position logits for the
        token *at* that position (a masked language model's guess for a masked token), and
        refuses ``kv_cache``, ``last_only`` and ``attention_mask``, which only generation needs.

        Returns ``(logits, loss)``, or ``(logits, loss, attentions)`` with ``return_attention``;
        ``loss`` is None without targets.
        """
        if not self.config.causal and (kv_cache is not None or last_only or attention_mask is not None):
            raise ValueError(NOT_CAUSAL)
        x, attentions = self._trunk(idx, kv_cache, return_attention, prefix, attention_mask, positions)
        if prefix is not None:
            x = x[:, prefix.size(1):]
        if not logits:
            if targets is None or last_only or return_attention:
                raise ValueError("logits=False computes the loss alone: it needs targets, and neither last_only "
                                 "nor return_attention")
            keep = targets != -100
            return None, F.cross_entropy(self.lm_head(x[keep]), targets[keep])
        if last_only:
            x = x[:, -1:, :]
        out = self.lm_head(x)
        loss = None
        if targets is not None:
            if last_only:
                raise ValueError("targets need logits at every position; drop last_only=True")
            loss = F.cross_entropy(out.reshape(-1, out.size(-1)), targets.reshape(-1), ignore_index=-100)
        if return_attention:
            return out, loss, attentions
        return out, loss

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B, T, n_embd), after ``ln_f``: what the output head reads,
        and what a reward or value head reads instead (:mod:`minigpt.rlhf`)."""
        return self._trunk(idx, None, False)[0]

    def _trunk(self, idx: torch.Tensor, kv_cache: KVCache | None, return_attention: bool,
               prefix: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Any]]:
        x = self.transformer.wte(idx)
        if prefix is not None:
            if prefix.dim() != 3 or prefix.size(0) != idx.size(0) or prefix.size(2) != self.config.n_embd:
                raise ValueError(f"prefix must be (batch={idx.size(0)}, length, n_embd={self.config.n_embd}) "
                                 f"vectors, got shape {tuple(prefix.shape)}")
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        B, T, _ = x.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            where = f"after {start} cached positions " if start else ""
            what = f"(a prefix of {prefix.size(1)} included) " if prefix is not None else ""
            raise ValueError(
                f"input of length {T} {what}{where}exceeds the model's block_size={self.config.block_size}; "
                f"crop the input to its last {self.config.block_size - start} tokens "
                "(e.g. idx[:, -block_size:]) or build the model with a larger block_size"
            )
        if kv_cache is not None and kv_cache.length + T > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} positions; {start} used, {T} more given")
        padding = self._padding(idx, attention_mask, kv_cache, prefix)
        if positions is not None:
            padding = self._given_positions(positions, idx, padding, prefix)
        if "wpe" in self.transformer:  # learned positions; RoPE rotates inside attention instead
            pos = padding.positions if padding is not None else \
                torch.arange(start, start + T, dtype=torch.long, device=idx.device)
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        attentions = []
        for block in self.transformer.h:
            x, att = block(x, kv_cache, return_attention, padding)
            attentions.append(att)
        if kv_cache is not None:
            kv_cache.length += T
        return self.transformer.ln_f(x), attentions

    def _given_positions(self, positions: torch.Tensor, idx: torch.Tensor, padding: Padding | None,
                         prefix: torch.Tensor | None) -> Padding:
        """``padding`` (or none) with the positions :meth:`forward` was given instead of its own."""
        if positions.shape != idx.shape:
            raise ValueError(f"positions must have the shape of idx {tuple(idx.shape)}, got {tuple(positions.shape)}")
        if prefix is not None:
            raise ValueError("positions and prefix cannot be combined: a prefix takes the first positions")
        if "wpe" in self.transformer and not 0 <= int(positions.min()) <= int(positions.max()) < self.config.block_size:
            raise ValueError(f"learned positions have rows 0..{self.config.block_size - 1}; got positions "
                             f"{int(positions.min())}..{int(positions.max())} (rotary positions take any)")
        return Padding(positions.to(idx.device, torch.long), padding.allowed if padding is not None else None)

    @staticmethod
    def _padding(idx: torch.Tensor, attention_mask: torch.Tensor | None, kv_cache: KVCache | None,
                 prefix: torch.Tensor | None) -> Padding | None:
        """The :class:`Padding` of a left-padded batch: from ``attention_mask`` and what the cache
        remembers of earlier calls' masks; None for a batch without padding."""
        if attention_mask is None and (kv_cache is None or kv_cache.real is None):
            return None
        if prefix is not None:
            raise ValueError("attention_mask and prefix cannot be combined: pad the token inputs of a "
                             "batch with a prefix on the right (targets -100), not on the left")
        B, T = idx.shape
        if attention_mask is None:
            real = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        elif attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask must have the shape of idx {tuple(idx.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        else:
            real = attention_mask.to(device=idx.device, dtype=torch.bool)
        if kv_cache is None:
            return Padding.of(real, T)
        if kv_cache.real is None:  # the first masked call: the positions cached so far were all real
            kv_cache.real = torch.ones(B, kv_cache.max_len, dtype=torch.bool, device=idx.device)
        start = kv_cache.length
        kv_cache.real[:, start:start + T] = real
        return Padding.of(kv_cache.real[:, :start + T], T)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, *,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` (default block_size)."""
        c = self.config
        if not c.causal:
            raise ValueError(NOT_CAUSAL)
        p = self.transformer.wte.weight
        return KVCache(c.n_layer, batch_size, c.kv_heads, min(max_len or c.block_size, c.block_size),
                       c.head_dim, dtype=dtype or p.dtype, device=device or p.device)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. ``non_embedding`` drops the position embedding, as nanoGPT reports;
        the token embedding stays because, tied, it is also the output layer's weight."""
        n = sum(p.numel() for p in self.parameters())  # tied weights are yielded once
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token: 6N for the weight matmuls plus
        12 * L * H * Q * T for attention scores and their weighted sum (PaLM appendix B)."""
        c = self.config
        t = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * t

    def flops_per_token_llmc(self, seq_len: int | None = None) -> int:
        """llm.c's count of the same, to compare with its published MFU: 6N with N every parameter
        (the position embedding too) + 6 * L * C * T (the causal half of the attention matmuls
        only): about 6% below :meth:`flops_per_token` for GPT-2 124M at T = 1024."""
        c = self.config
        return 6 * self.num_params(non_embedding=False) + 6 * c.n_layer * c.n_embd * (seq_len or c.block_size)

    # -- Checkpoint conversion -------------------------------------------------------------
    # Hugging Face's GPT-2 stores its linear layers as ``Conv1D`` with weight (in, out): the
    # transpose of nn.Linear's (out, in). Everything else maps one to one.
    _CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_hf_state_dict(cls, state_dict: dict[str, torch.Tensor], config: GPTConfig) -> GPT:
        """Build a model from a ``GPT2LMHeadModel`` (or ``GPT2Model``) state dict."""
        _require_gpt2_block(config)
        model = cls(config)
        ours = model.state_dict()
        converted = {}
        for key, value in state_dict.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
                continue
            name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
            if name not in ours:
                raise KeyError(f"unexpected key {key!r} in the Hugging Face state dict")
            converted[name] = value.t() if name.endswith(cls._CONV1D) else value
        if "lm_head.weight" in converted:  # tied to wte: keep one source of truth
            head = converted.pop("lm_head.weight")
            if not torch.equal(head, converted.get("transformer.wte.weight", head)):
                raise ValueError("lm_head.weight differs from wte.weight; this GPT ties them")
        missing = set(ours) - set(converted) - {"lm_head.weight"}
        if missing:
            raise KeyError(f"the state dict lacks {sorted(missing)}")
        for name, value in converted.items():
            if value.shape != ours[name].shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model "
                                 f"{tuple(ours[name].shape)}; does the config match the checkpoint?")
        model.load_state_dict(converted, strict=False)
        return model

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`from_hf_state_dict`, loadable into ``GPT2LMHeadModel``
        (``strict=False``: it lacks the mask buffers, which the model rebuilds itself)."""
        _require_gpt2_block(self.config)
        return {name: (p.t() if name.endswith(self._CONV1D) else p).detach().clone()
                for name, p in self.state_dict().items()}

    @classmethod
    def from_pretrained(cls, name: str = "gpt2", **overrides: Any) -> GPT:
        """OpenAI's GPT-2 weights via ``transformers`` (from its local cache, else downloaded).

        Fails within seconds with a clear message when the Hub is unreachable, instead of
        sitting through ``huggingface_hub``'s retries.
        """
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise ImportError("from_pretrained needs transformers: pip install transformers") from e
        try:  # the local cache first: fast, and works offline
            hf = GPT2LMHeadModel.from_pretrained(name, local_files_only=True)
        except OSError:
            what = f"GPT-2 weights {name!r} (not in the local Hugging Face cache)"
            remedy = "or copy the model into the cache (`hf download gpt2` on a connected machine)"
            require_hub(what, remedy=remedy)
            with hub_failures(what, remedy):
                hf = GPT2LMHeadModel.from_pretrained(name)
        config = GPTConfig.from_hf_config(hf.config, **overrides)
        return cls.from_hf_state_dict(hf.state_dict(), config)


@contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Run the block with ``modules`` in eval mode, then give each back the mode it had.

    Eval mode turns dropout off, so sampling, scoring and measuring are deterministic and cached
    generation matches uncached; restoring the caller's mode (even when the block raises, or a
    generator inside it is closed early) means a helper never silently switches training off.
    """
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, was):
            m.train(mode)


def _require_gpt2_block(config: GPTConfig) -> None:
    """GPT-2's weights and layout exist only for GPT-2's block: say which switch is off."""
    if not config.is_gpt2:
        changed = {k: getattr(config, k) for k in ("norm", "mlp", "position", "n_kv_head", "causal")
                   if getattr(config, k) != getattr(GPTConfig, k)}
        raise ValueError(f"the GPT-2 layout needs GPT-2's block, but this config sets {changed}; "
                         "use norm='layernorm', mlp='gelu', position='learned', n_kv_head=None, causal=True")
