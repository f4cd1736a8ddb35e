"""Export to the Hugging Face layout, so ``GPT2LMHeadModel.from_pretrained(folder)`` loads our model.

A folder with ``config.json`` and ``model.safetensors`` is all transformers needs; writing them
ourselves keeps transformers out of the package's requirements. A model with LoRA adapters (a
``minigpt sft --lora`` run) is exported with them merged in: transformers' GPT-2 has no place for
them and would drop them without a word, leaving the base model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from minigpt.lora import LoRALinear, TokenRows, merged_state_dict
from minigpt.model import GPT, GPTConfig


def save_hf(model: GPT, folder: str | os.PathLike, *, eos_token_id: int | None = None) -> Path:
    """Write ``model`` as a transformers GPT-2 (``config.json`` + ``model.safetensors``)."""
    c = model.config
    if not c.bias:
        raise ValueError("transformers' GPT-2 always has biases; export needs a model with bias=True")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "tie_word_embeddings": True, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
    }
    weights = _without_adapters(model).to_hf_state_dict()
    weights.pop("lm_head.weight", None)  # tied to wte; transformers re-ties it on load
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _without_adapters(model: GPT) -> GPT:
    """``model``, or if it has LoRA adapters or token rows a plain GPT with them merged in
    (``model`` keeps its adapters, unmerged)."""
    if not any(isinstance(m, LoRALinear | TokenRows) for m in model.modules()):
        return model
    with torch.device("meta"):  # no memory for weights that load_state_dict replaces at once
        plain = GPT(model.config)
    plain.load_state_dict(merged_state_dict(model), assign=True)
    return plain


def load_hf(folder: str | os.PathLike) -> GPT:
    """Read a folder written by :func:`save_hf` (or any GPT-2 saved by transformers as safetensors)."""
    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} is missing; is {folder} a Hugging Face GPT-2 folder?")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "gpt2":
        raise ValueError(f"{folder / 'config.json'} describes a {config.get('model_type')!r} model, not gpt2")
    # The same translation, and the same refusal of options this model lacks, as from_pretrained's.
    gpt_config = GPTConfig.from_hf_config(SimpleNamespace(**config))
    return GPT.from_hf_state_dict(load_file(str(folder / "model.safetensors")), gpt_config)
