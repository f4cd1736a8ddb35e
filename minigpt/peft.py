"""Parameter-efficient fine-tuning beyond LoRA (chapter 13): adapters, (IA)^3, prefix and prompt tuning.

Each method freezes every weight of a GPT and adds a few new parameters in one place:

* **adapters** (Houlsby et al. 2019, :class:`Adapter`): a small bottleneck MLP,
  ``y + W_up gelu(W_down y)``, on the output of each attention and each MLP, before the residual
  add. ``W_up`` starts at zero, so the adapted model starts as the model it adapts. He et al.
  (2022) put the same bottleneck *beside* each sublayer instead (:class:`ParallelAdapter`),
  reading the sublayer's normalised input and adding ``s W_up gelu(W_down x)`` to its output: the
  same parameters, learning chapter 13's task B faster at its sizes (``book/recipes.md``). Like
  LoRA's matrices, an adapter's carry no weight decay, which would pull the adapted model back
  towards the frozen one.
* **(IA)^3** (Liu et al. 2022, :class:`Rescaled`): three learned vectors per block that rescale,
  feature by feature, the keys, the values and the MLP's hidden activations. They start at one.
  The fewest parameters of all, and, being scales of a linear map, foldable into its weight.
* **prefix tuning** (Li & Liang 2021, :class:`PrefixKV`): ``length`` learned key and value vectors
  per layer, which every query sees before the tokens' own (``CausalSelfAttention.prefix``).
* **prompt tuning** (Lester et al. 2021, :func:`soft_prompt`): ``length`` new tokens whose
  embedding rows alone train, written as the system message of every conversation: a prompt the
  model reads, learned as vectors instead of chosen as words. It is prefix tuning at the input
  only: its keys and values in every layer are what the frozen model makes of those vectors.

LoRA (:mod:`minigpt.lora`) is the fifth. :func:`apply_peft` applies one of the first three by name,
with arguments that :func:`minigpt.sft.sft` records in ``run.json`` so that
:func:`minigpt.runs.load_run` rebuilds the model. Prompt tuning changes the tokenizer and the data
instead, and its rows train through LoRA's token rows (:class:`~minigpt.lora.TokenRows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.chat import CHAT_TOKENS, SOFT_TOKEN
from minigpt.lora import LoRALinear, TokenRows, train_modules
from minigpt.model import GPT, Block, causal_mask
from minigpt.tokenizer import BPETokenizer

__all__ = ["Adapter", "PEFT_METHODS", "PLACEMENTS", "ParallelAdapter", "PrefixKV", "Rescaled", "apply_adapters",
           "apply_ia3", "apply_peft", "apply_prefix", "soft_prompt", "trainable_parameters"]


def _bottleneck(width: int, bottleneck: int, like: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    """An adapter's two layers, ``down`` (width -> bottleneck) and ``up`` (back), on ``like``'s
    device and dtype. ``up`` starts at zero, so the adapted model starts as the model it adapts;
    ``down`` keeps nn.Linear's random start, as LoRA's A does."""
    if bottleneck < 1:
        raise ValueError(f"bottleneck={bottleneck} must be at least 1")
    down, up = nn.Linear(width, bottleneck).to(like), nn.Linear(bottleneck, width).to(like)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)
    return down, up


class Adapter(nn.Module):
    """A frozen linear layer followed by a residual bottleneck: ``y + up(gelu(down(y)))`` with
    ``y = base(x)``. ``up`` starts at zero, so at first the layer is ``base`` exactly."""

    def __init__(self, base: nn.Linear, bottleneck: int) -> None:
        super().__init__()
        self.base = base
        self.down, self.up = _bottleneck(base.out_features, bottleneck, base.weight)

    def no_decay_parameters(self) -> tuple[nn.Parameter, ...]:
        """The matrices an optimizer should not decay: as LoRA's, decay would pull the adapted model
        towards the frozen one (:func:`minigpt.train.make_optimizer` asks every module)."""
        return (self.down.weight, self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.up(F.gelu(self.down(y)))


class ParallelAdapter(nn.Module):
    """A frozen sublayer with a bottleneck beside it, reading the same input (He et al. 2022's
    parallel adapter): ``base(x) + scale * up(gelu(down(x)))``. Where ``base`` returns a tuple
    (attention: its output and its weights), the bottleneck adds to the first element. ``up``
    starts at zero, so at first the module is ``base`` exactly; ``scale`` (He et al.'s 4) sets how
    much each of the bottleneck's steps changes the output at a given learning rate (chapter 13's
    recipe uses 1, as it uses LoRA's alpha = rank: larger made task B slower to learn). Beside a
    whole sublayer it reads the LayerNorm's output, a better-scaled input than the projection's
    output that a sequential :class:`Adapter` reads."""

    def __init__(self, base: nn.Module, width: int, bottleneck: int, scale: float = 4.0) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        self.down, self.up = _bottleneck(width, bottleneck, next(base.parameters()))

    no_decay_parameters = Adapter.no_decay_parameters

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base(x, *args, **kwargs)
        delta = self.scale * self.up(F.gelu(self.down(x)))
        return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta


class Rescaled(nn.Module):
    """A frozen linear layer with learned per-feature scales, (IA)^3's one kind of parameter:
    of its inputs (``inputs=True``: ``base(x * scale)``), or of its outputs from feature ``start``
    on (``base(x)[..., start:] * scale``; the features before ``start`` pass unscaled). Scales start
    at one."""

    def __init__(self, base: nn.Linear, *, inputs: bool = False, start: int = 0) -> None:
        super().__init__()
        width = base.in_features if inputs else base.out_features - start
        if width < 1:
            raise ValueError(f"start={start} leaves no output feature of {base.out_features} to scale")
        self.base, self.inputs, self.start = base, inputs, start
        self.scale = nn.Parameter(torch.ones(width, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs:
            return self.base(x * self.scale)
        y = self.base(x)
        return torch.cat([y[..., :self.start], y[..., self.start:] * self.scale], dim=-1)


class PrefixKV(nn.Module):
    """``length`` learned keys and values of one attention layer, one set per key/value head,
    which every query may attend to before the tokens' own. They hold no position and are not
    written to a KV cache: ``CausalSelfAttention`` calls this module at every step."""

    def __init__(self, length: int, n_kv_head: int, head_dim: int) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"length={length} must be at least 1")
        self.k = nn.Parameter(torch.randn(n_kv_head, length, head_dim) * 0.02)
        self.v = nn.Parameter(torch.randn(n_kv_head, length, head_dim) * 0.02)

    def forward(self, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, t_query: int,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The keys and values (B, H, T_key, D) with the prefix's in front, and the attention mask
        ``allowed`` (None: plain causal) with the prefix visible to every query."""
        batch, heads = k.size(0), k.size(1)
        k, v = (torch.cat([p.to(t.dtype).repeat_interleave(heads // p.size(0), dim=0).expand(batch, -1, -1, -1), t],
                          dim=2) for p, t in ((self.k, k), (self.v, v)))
        if not causal:  # every query sees every key already
            return k, v, allowed
        length = self.k.size(1)
        if allowed is None:
            allowed = causal_mask(t_query, k.size(2) - length, k.device)
        return k, v, torch.cat([allowed.new_ones(*allowed.shape[:-1], length), allowed], dim=-1)


def _frozen_blocks(model: GPT) -> list[Block]:
    """Freeze every weight of ``model`` and return its blocks, for a method to add its parameters
    to; a model already adapted is refused (two methods at once would be neither)."""
    adapted = [name for name, m in model.named_modules()
               if isinstance(m, Adapter | ParallelAdapter | Rescaled | PrefixKV | LoRALinear | TokenRows)]
    if adapted:
        raise ValueError(f"the model is already adapted ({adapted[0]}); start from a plain GPT")
    for p in model.parameters():
        p.requires_grad_(False)
    return list(model.transformer.h)


#: Where :func:`apply_adapters` puts them.
PLACEMENTS = ("sequential", "parallel")


def apply_adapters(model: GPT, bottleneck: int = 16, placement: str = "sequential", scale: float = 4.0) -> GPT:
    """Freeze ``model`` and give each attention and each MLP an adapter of width ``bottleneck``
    (two per block, the same parameters either way); in place. ``placement="sequential"``: an
    :class:`Adapter` after each output projection (Houlsby et al.); ``"parallel"``: a
    :class:`ParallelAdapter` of ``scale`` beside each whole sublayer (He et al.)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} must be one of {', '.join(PLACEMENTS)}")
    for block in _frozen_blocks(model):
        if placement == "parallel":
            width = model.config.n_embd
            block.attn = ParallelAdapter(block.attn, width, bottleneck, scale)
            block.mlp = ParallelAdapter(block.mlp, width, bottleneck, scale)
        else:
            block.attn.c_proj = Adapter(block.attn.c_proj, bottleneck)
            block.mlp.c_proj = Adapter(block.mlp.c_proj, bottleneck)
    return model


def apply_ia3(model: GPT) -> GPT:
    """Freeze ``model`` and give each block (IA)^3's three vectors: scales of the keys and values
    (the outputs of ``c_attn`` after the queries) and of the MLP's hidden activations (the inputs
    of its ``c_proj``); in place."""
    for block in _frozen_blocks(model):
        block.attn.c_attn = Rescaled(block.attn.c_attn, start=block.attn.n_embd)
        block.mlp.c_proj = Rescaled(block.mlp.c_proj, inputs=True)
    return model


@torch.no_grad()
def apply_prefix(model: GPT, length: int = 8, init_ids: list[int] | None = None) -> GPT:
    """Freeze ``model`` and give each attention layer a :class:`PrefixKV` of ``length`` vectors;
    in place. With ``init_ids`` (at least ``length`` token ids), each layer's prefix starts as the
    keys and values the model itself computes for the first ``length`` of them: real text, a far
    better start than noise, which Li & Liang found unstable to train."""
    blocks, c = _frozen_blocks(model), model.config
    prefixes = [PrefixKV(length, c.kv_heads, c.head_dim).to(model.transformer.wte.weight) for _ in blocks]
    if init_ids is not None:
        if len(init_ids) < length:
            raise ValueError(f"init_ids has {len(init_ids)} tokens; the prefix needs {length}")
        device = model.transformer.wte.weight.device
        cache = model.new_kv_cache(1, length)
        model(torch.tensor([init_ids[:length]], device=device), kv_cache=cache, last_only=True)
        for layer, prefix in enumerate(prefixes):
            prefix.k.copy_(cache.k[layer, 0])
            prefix.v.copy_(cache.v[layer, 0])
    for block, prefix in zip(blocks, prefixes):
        block.attn.prefix = prefix
    return model


#: The methods :func:`apply_peft` applies by name, to the model alone.
PEFT_METHODS: dict[str, Callable[..., GPT]] = {"adapter": apply_adapters, "ia3": apply_ia3, "prefix": apply_prefix}


def apply_peft(model: GPT, method: str, *, train_also: Sequence[str] = (), **options: Any) -> GPT:
    """``PEFT_METHODS[method](model, **options)``, then the modules ``train_also`` names train in
    full as well (:func:`~minigpt.lora.train_modules`: the LayerNorms, as Houlsby et al. did): the
    form run.json records."""
    if method not in PEFT_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(PEFT_METHODS)} "
                         "(LoRA is minigpt.lora.apply_lora, prompt tuning minigpt.peft.soft_prompt)")
    PEFT_METHODS[method](model, **options)
    train_modules(model, train_also)
    return model


@torch.no_grad()
def soft_prompt(model: GPT, tokenizer: BPETokenizer, length: int,
                init_text: str) -> tuple[GPT, BPETokenizer, str, list[int]]:
    """Prompt tuning's parts: a copy of ``model`` whose vocabulary has ``length`` new tokens, the
    tokenizer that has them, the text of the prompt (the tokens in order: a system message before
    every conversation) and their ids (the embedding rows that train, as LoRA's ``token_rows``
    with no adapters). Their rows start as the embeddings of ``init_text``'s tokens, repeated as
    needed (Lester et al. start from real vocabulary too: random vectors train worse)."""
    from minigpt.sft import resize_vocab  # sft imports this module

    if length < 1:
        raise ValueError(f"length={length} must be at least 1")
    names = [SOFT_TOKEN.format(i) for i in range(length)]
    taken = [n for n in names if n in tokenizer.special_tokens]
    if taken:
        raise ValueError(f"the tokenizer has {taken[0]} already: it holds a soft prompt; start from its base")
    chat = [n for n in CHAT_TOKENS if n not in tokenizer.special_tokens]
    if chat:
        raise ValueError(f"the tokenizer lacks the chat tokens {chat}; use minigpt.chat.with_chat_tokens first")
    init = [i for i in tokenizer.encode(init_text) if i not in tokenizer.special_tokens.values()]
    if not init:
        raise ValueError(f"init_text={init_text!r} has no ordinary tokens to start the soft prompt from")
    bigger = tokenizer.add_special_tokens(names)
    model = resize_vocab(model, bigger.vocab_size)
    ids = [bigger.special_tokens[n] for n in names]
    table = model.transformer.wte.weight
    for i, row in enumerate(ids):
        table[row] = table[init[i % len(init)]]
    return model, bigger, "".join(names), ids


def trainable_parameters(model: nn.Module) -> int:
    """The number of parameters that train (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
