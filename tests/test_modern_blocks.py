"""The modern-block switches: each piece against its formula, Llama parity, caches, checkpoints,
and the chapter 9 comparison at `ci`."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import minigpt
from minigpt.blocks import compare_blocks, format_table, variants
from minigpt.checkpoint import (
    checkpoint_config,
    load_checkpoint,
    read_safetensors,
    save_checkpoint,
    write_safetensors,
)
from minigpt.export import save_hf
from minigpt.generate import generate
from minigpt.model import GPT, CausalSelfAttention, GPTConfig, apply_rope, make_norm, rope_cos_sin

SMALL = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=64)
SWITCHES = dict(norm=("layernorm", "rmsnorm"), mlp=("gelu", "swiglu"), position=("learned", "rope"),
                n_kv_head=(None, 2))
COMBINATIONS = [dict(zip(SWITCHES, values)) for values in itertools.product(*SWITCHES.values())]
LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_head=2)


def small_gpt(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **overrides})).eval()  # type: ignore[arg-type]


def tokens(batch: int = 3, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(100, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_defaults_are_gpt2() -> None:
    config = GPTConfig(**SMALL)  # type: ignore[arg-type]
    assert config.is_gpt2 and config.kv_heads == 4 and config.mlp_hidden == 256
    shapes = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    assert shapes["transformer.wpe.weight"] == (32, 64)
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (192, 64)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (256, 64)
    assert shapes["transformer.h.0.ln_1.bias"] == (64,)
    assert GPTConfig(**SMALL, n_kv_head=4).is_gpt2  # type: ignore[arg-type]


def test_rmsnorm_is_the_formula() -> None:
    norm = make_norm(GPTConfig(**SMALL, norm="rmsnorm"))  # type: ignore[arg-type]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 64) * 3 + 1
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]  # no bias, whatever config.bias says


def test_rope_is_a_rotation_with_relative_scores() -> None:
    D = 16
    q, k = torch.randn(D, generator=torch.Generator().manual_seed(0)), torch.randn(D)

    def at(x: torch.Tensor, position: int) -> torch.Tensor:
        cos, sin = rope_cos_sin(torch.tensor([position]), D)
        return apply_rope(x[None], cos, sin)[0]

    torch.testing.assert_close(at(q, 0), q)  # position 0: no rotation
    for p in (1, 7, 1000):
        torch.testing.assert_close(at(q, p).norm(), q.norm())
    # q_m . k_n depends on m - n only: the same offset at different absolute positions ...
    for offset in (0, 3, 17):
        scores = torch.stack([at(q, n + offset) @ at(k, n) for n in (0, 5, 40, 300)])
        torch.testing.assert_close(scores, scores[:1].expand(4), atol=1e-4, rtol=1e-4)
    # ... while different offsets give different scores.
    assert abs(at(q, 3) @ at(k, 0) - at(q, 17) @ at(k, 0)) > 1e-3


def test_swiglu_width_and_formula() -> None:
    assert [GPTConfig(**{**SMALL, "n_embd": c}, mlp="swiglu").mlp_hidden  # type: ignore[arg-type]
            for c in (64, 128, 768)] == [168, 344, 2048]
    model = small_gpt(mlp="swiglu", bias=False)
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 5, 64)
    gate, value = (x @ mlp.c_fc.weight.T).chunk(2, dim=-1)
    torch.testing.assert_close(mlp(x), (torch.nn.functional.silu(gate) * value) @ mlp.c_proj.weight.T)
    per_layer = {m: sum(p.numel() for p in small_gpt(mlp=m).transformer.h[0].mlp.parameters()) for m in ("gelu", "swiglu")}
    assert abs(per_layer["swiglu"] / per_layer["gelu"] - 1) < 0.05


def test_gqa_equals_attention_with_repeated_key_value_heads() -> None:
    torch.manual_seed(0)
    gqa = CausalSelfAttention(GPTConfig(**SMALL, n_kv_head=2)).eval()  # type: ignore[arg-type]
    full = CausalSelfAttention(GPTConfig(**SMALL)).eval()  # type: ignore[arg-type]
    C, D = 64, 16
    with torch.no_grad():
        wq, wk, wv = gqa.c_attn.weight.split([C, 2 * D, 2 * D])
        bq, bk, bv = gqa.c_attn.bias.split([C, 2 * D, 2 * D])
        # Query heads 0 and 1 read key/value head 0, heads 2 and 3 read head 1.
        rep = lambda t: t.view(2, D, *t.shape[1:]).repeat_interleave(2, dim=0).reshape(C, *t.shape[1:])  # noqa: E731
        full.c_attn.weight.copy_(torch.cat([wq, rep(wk), rep(wv)]))
        full.c_attn.bias.copy_(torch.cat([bq, rep(bk), rep(bv)]))
        full.c_proj.load_state_dict(gqa.c_proj.state_dict())
        x = torch.randn(2, 9, C)
        torch.testing.assert_close(gqa(x)[0], full(x)[0])
    saved = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in gqa.parameters())
    assert saved == 2 * (4 - 2) * D * (C + 1)  # two fewer key and value heads: weights and biases


def test_gqa_with_all_heads_is_standard_attention() -> None:
    idx = tokens()
    a, b = small_gpt(n_kv_head=4), small_gpt()
    assert a.state_dict().keys() == b.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(a(idx)[0], b(idx)[0], atol=0, rtol=0)
    assert small_gpt(n_kv_head=1).num_params() < small_gpt(n_kv_head=2).num_params() < b.num_params()


@pytest.mark.parametrize("switches", COMBINATIONS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_cached_equals_uncached_for_every_switch(switches: dict) -> None:
    """Prefill 5, one token, a chunk of 3 (the explicit-mask path), in both attention paths; then
    greedy generation with and without the cache."""
    idx = tokens(length=9)
    for impl in ("sdpa", "naive"):
        model = small_gpt(attn_impl=impl, **switches)
        cache = model.new_kv_cache(batch_size=3, max_len=9)
        assert cache.k.size(2) == model.config.kv_heads
        with torch.no_grad():
            full, _ = model(idx)
            parts = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 9))]
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    cached = generate(model, idx[:, :4], 12, temperature=0)
    assert torch.equal(cached, generate(model, idx[:, :4], 12, temperature=0, use_cache=False))


def test_sdpa_equals_naive_with_every_switch() -> None:
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(small_gpt(**LLAMA)(idx)[0], small_gpt(attn_impl="naive", **LLAMA)(idx)[0],
                                   atol=1e-5, rtol=1e-5)


def _to_llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our Llama-style GPT in transformers' LlamaForCausalLM names (q/k/v and gate/up unfused)."""
    c = model.config
    kv = c.kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": model.transformer.wte.weight, "model.norm.weight": model.transformer.ln_f.weight,
           "lm_head.weight": model.transformer.wte.weight}
    for i, block in enumerate(model.transformer.h):
        p = f"model.layers.{i}."
        q, k, v = block.attn.c_attn.weight.split([c.n_embd, kv, kv])
        gate, up = block.mlp.c_fc.weight.chunk(2)
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                    p + "self_attn.o_proj.weight": block.attn.c_proj.weight, p + "mlp.gate_proj.weight": gate,
                    p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": block.mlp.c_proj.weight,
                    p + "input_layernorm.weight": block.ln_1.weight, p + "post_attention_layernorm.weight": block.ln_2.weight})
    return out


def test_llama_style_matches_transformers_llama() -> None:
    """All four switches with bias=False are Llama's architecture: same logits from the same weights."""
    model = small_gpt(bias=False, **LLAMA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)  # RMSNorm gains away from 1, so they are checked too
    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads, max_position_embeddings=c.block_size,
        rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(_to_llama_state_dict(model), strict=False)
    assert not missing and not unexpected
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_checkpoint_round_trip_with_switches(tmp_path: Path) -> None:
    model = small_gpt(**LLAMA, rope_theta=500.0)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", model, step=3)
    assert checkpoint_config(path) == model.config
    loaded, state = load_checkpoint(path)
    assert state == {"step": 3} and loaded.config.position == "rope" and "transformer.wpe.weight" not in loaded.state_dict()
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_old_checkpoint_without_the_fields_loads_as_gpt2(tmp_path: Path) -> None:
    model = small_gpt()
    path = save_checkpoint(tmp_path / "new.safetensors", model, step=1)
    tensors, header = read_safetensors(path, "checkpoint")
    meta = json.loads(header["minigpt"])
    for name in ("norm", "mlp", "position", "n_kv_head", "rope_theta"):
        del meta["config"][name]  # what a checkpoint written before the switches holds
    old = write_safetensors(tmp_path / "old.safetensors", tensors, {**header, "minigpt": json.dumps(meta)})
    loaded, _ = load_checkpoint(old)
    assert loaded.config == model.config and loaded.config.is_gpt2


def test_hf_gpt2_layout_refuses_modern_blocks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"needs GPT-2's block.*'position': 'rope'.*use norm='layernorm'"):
        save_hf(small_gpt(position="rope"), tmp_path / "hf")
    with pytest.raises(ValueError, match="'n_kv_head': 2"):
        GPT.from_hf_state_dict({}, GPTConfig(**SMALL, n_kv_head=2))  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(norm="batchnorm"), "norm='batchnorm' must be one of 'layernorm', 'rmsnorm'"),
    (dict(mlp="relu"), "mlp='relu' must be one of 'gelu', 'swiglu'"),
    (dict(position="alibi"), "position='alibi' must be one of 'learned', 'rope'"),
    (dict(n_kv_head=3), r"n_kv_head=3 must divide n_head=4 .*choose one of \[1, 2, 4\]"),
    (dict(n_kv_head=0), "n_kv_head=0 must divide"),
    (dict(n_embd=60, n_head=20, position="rope"), "head_dim = n_embd / n_head = 3 is odd"),
    (dict(position="rope", rope_theta=1.0), "rope_theta=1.0 must be > 1"),
])
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**SMALL, **kwargs})


def test_compare_blocks_rejects_unknown_variants() -> None:
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['Mamba'\]; choose from GPT-2, RMSNorm"):
        compare_blocks(minigpt.recipe("ci"), names=["Mamba"])
    assert variants(1)["GQA"] == {"n_kv_head": 1}
    # Half the heads, or the largest count below half that divides n_head (GPT-2 XL has 25 heads).
    assert [variants(n)["GQA"]["n_kv_head"] for n in (2, 4, 5, 6, 7, 12, 25)] == [1, 2, 1, 3, 1, 6, 5]


@pytest.mark.slow
@pytest.mark.outcome
def test_every_variant_learns_at_ci(ci, outcome) -> None:
    """The chapter's comparison at `ci` (about 15 s): every variant starts at ln(vocab) = 6.24 and
    learns. Which variant wins is not asserted: the differences between variants change sign from
    seed to seed at this size."""
    runs = {r.name: r for r in compare_blocks(ci)}
    print(format_table(list(runs.values())))
    assert list(runs) == list(variants(ci.model.n_head))
    for r in runs.values():
        outcome.check(f"blocks {r.name}: val loss below uniform", r.val_loss - math.log(ci.tokenizer.vocab_size),
                      "<", -0.7)  # spread -1.184 .. -0.832 (30 runs)
        assert r.params > 0 and len(r.val_history) == 2
    assert runs["GQA"].params < runs["GPT-2"].params and runs["GQA"].kv_cache_per_token == runs["GPT-2"].kv_cache_per_token // 2
    assert abs(runs["SwiGLU"].params / runs["GPT-2"].params - 1) < 0.02
