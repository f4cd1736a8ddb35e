"""The GPT matches Hugging Face's GPT-2 numerically, and its two attention paths agree."""

from __future__ import annotations

import math
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt.errors import NetworkError
from minigpt.generate import generate
from minigpt.model import GPT, Block, CausalSelfAttention, GPTConfig, KVCache, Padding, evaluating
from minigpt.train import TrainConfig, Trainer

SMALL = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture
def hf_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=32, n_layer=2, n_head=4, n_embd=64)
    return GPT2LMHeadModel(config).eval()


def small_gpt(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **overrides})).eval()  # type: ignore[arg-type]


def tokens(batch: int = 3, length: int = 32, vocab: int = 100, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(hf_model: GPT2LMHeadModel) -> None:
    model = GPT.from_hf_state_dict(hf_model.state_dict(), GPTConfig.from_hf_config(hf_model.config)).eval()
    idx = tokens()
    with torch.no_grad():
        expected = hf_model(idx).logits
        logits, _ = model(idx)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_a_gpt2_config_with_options_this_model_lacks_is_refused() -> None:
    for option in (dict(activation_function="gelu"), dict(layer_norm_epsilon=1e-2),
                   dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False)):
        config = GPT2Config(vocab_size=100, n_positions=32, n_layer=2, n_head=4, n_embd=64, **option)
        with pytest.raises(ValueError, match=f"sets {{'{next(iter(option))}'.*does not implement"):
            GPTConfig.from_hf_config(config)


def test_hf_round_trip(hf_model: GPT2LMHeadModel) -> None:
    model = GPT.from_hf_state_dict(hf_model.state_dict(), GPTConfig.from_hf_config(hf_model.config))
    exported = model.to_hf_state_dict()
    for name, value in hf_model.state_dict().items():
        if name in exported:
            torch.testing.assert_close(exported[name], value, atol=0, rtol=0)
    missing, unexpected = GPT2LMHeadModel(hf_model.config).load_state_dict(exported, strict=False)
    assert not unexpected and all(".attn." in k and k.endswith("bias") for k in missing)


def test_from_hf_rejects_wrong_shapes(hf_model: GPT2LMHeadModel) -> None:
    with pytest.raises(ValueError, match="does the config match"):
        GPT.from_hf_state_dict(hf_model.state_dict(), GPTConfig(**{**SMALL, "vocab_size": 101}))


@pytest.mark.parametrize("length", [1, 7, 32])
def test_naive_equals_sdpa(length: int) -> None:
    sdpa, naive = small_gpt(attn_impl="sdpa"), small_gpt(attn_impl="naive")
    idx = tokens(length=length)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(idx)[0], naive(idx)[0], atol=1e-5, rtol=1e-5)


def test_attention_weights_are_causal_distributions() -> None:
    model = small_gpt()
    idx = tokens(length=10)
    with torch.no_grad():
        logits, loss, atts = model(idx, return_attention=True)
        torch.testing.assert_close(logits, model(idx)[0], atol=1e-5, rtol=1e-5)
    assert loss is None and len(atts) == SMALL["n_layer"]
    for att in atts:
        assert att.shape == (3, SMALL["n_head"], 10, 10)
        torch.testing.assert_close(att.sum(-1), torch.ones(3, SMALL["n_head"], 10))
        assert torch.all(att.triu(diagonal=1) == 0)


def test_cached_forward_equals_full_forward() -> None:
    """Prefill 5, then 1 token, then a chunk of 3: the chunk exercises the explicit-mask path."""
    for impl in ("sdpa", "naive"):
        model = small_gpt(attn_impl=impl)
        idx = tokens(length=9)
        cache = model.new_kv_cache(batch_size=3, max_len=9)
        with torch.no_grad():
            full, _ = model(idx)
            parts = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 9))]
        assert cache.length == 9
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_last_only_logits() -> None:
    model = small_gpt()
    idx = tokens(length=8)
    with torch.no_grad():
        last, _ = model(idx, last_only=True)
        torch.testing.assert_close(last, model(idx)[0][:, -1:], atol=1e-6, rtol=1e-6)


def test_weight_tying_and_init() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=256))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias") and "ln_" not in name:
            assert torch.all(p == 0), name


def test_gpt2_124m_param_count() -> None:
    model = GPT(GPTConfig.gpt2("124M"))
    assert model.num_params(non_embedding=False) == 124_439_808  # the famous "124M"
    assert model.num_params() == 124_439_808 - 1024 * 768  # nanoGPT's "123.65M": minus wpe
    c = model.config
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 12 * 12 * 64 * 1024
    assert GPTConfig.gpt2("gpt2-medium").n_layer == 24 and c.head_dim == 64


def test_from_recipe() -> None:
    import minigpt

    m = minigpt.recipe("ci").model
    c = GPTConfig.from_recipe(minigpt.recipe("ci"), vocab_size=65, n_layer=3)
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (3, m.n_head, m.n_embd, m.block_size, 65)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(n_embd=100, n_head=3), "n_embd=100 is not divisible by n_head=3; pick"),
    (dict(n_layer=0), "n_layer=0 must be a positive integer"),
    (dict(vocab_size=-5), "vocab_size=-5 must be a positive integer"),
    (dict(dropout=1.0), "dropout"),
    (dict(attn_impl="flash"), "attn_impl"),
])
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**SMALL, **kwargs})
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        GPTConfig.gpt2("7B")


def test_too_long_input_error() -> None:
    model = small_gpt()
    with pytest.raises(ValueError, match=r"length 33 exceeds the model's block_size=32; crop"):
        model(tokens(length=33))
    cache = model.new_kv_cache(batch_size=3)
    model(tokens(length=30), kv_cache=cache)
    with pytest.raises(ValueError, match="after 30 cached positions"):
        model(tokens(length=3), kv_cache=cache)


def test_loss_ignores_minus_100() -> None:
    model = small_gpt()
    idx, targets = tokens(length=8), tokens(length=8, seed=2)
    masked = targets.clone()
    masked[:, :5] = -100
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 100), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    # An untrained model is close to uniform: loss ~ ln(vocab).
    assert abs(model(idx, targets)[1].item() - math.log(100)) < 0.2


def test_head_at_targets_only_gives_the_same_loss_and_gradients() -> None:
    """forward(logits=False) runs the output head only where a target counts (SFT's answers)."""
    idx, targets = tokens(length=12), tokens(length=12, seed=2)
    targets[:, :9] = -100
    targets[1, 10] = -100
    grads = []
    for logits in (True, False):
        model = small_gpt()
        out, loss = model(idx, targets, logits=logits)
        assert (out is None) != logits
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="needs targets"):
        small_gpt()(idx, logits=False)


def test_trainer_with_head_at_targets_only_matches_the_full_head() -> None:
    class Source:  # one fixed batch whose first half of every row is prompt (-100)
        def __init__(self) -> None:
            self.x, self.y = tokens(length=16), tokens(length=16, seed=2)
            self.y[:, :8] = -100

        def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
            return self.x, self.y

        def reset(self) -> None:
            pass

    runs = []
    for sparse in (False, True):
        cfg = TrainConfig(max_steps=3, warmup_steps=1, eval_interval=0, head_at_targets_only=sparse)
        trainer = Trainer(small_gpt().train(), cfg, Source(), Source())
        runs.append([trainer.train_step()["loss"] for _ in range(3)] + [trainer.evaluate()["val_loss"]])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    with pytest.raises(ValueError, match="torch.compile"):
        TrainConfig(head_at_targets_only=True, compile=True)


def test_module_shapes_and_kv_cache_layout() -> None:
    config = GPTConfig(**SMALL)  # type: ignore[arg-type]
    x = torch.randn(2, 5, 64)
    y, att = CausalSelfAttention(config)(x)
    assert y.shape == x.shape and att is None
    y, att = Block(config)(x, need_weights=True)
    assert y.shape == x.shape and att is not None and att.shape == (2, 4, 5, 5)
    cache = KVCache(2, 2, 4, 16, 16)
    assert cache.k.shape == (2, 2, 4, 16, 16) and cache.length == 0


def test_train_step_reduces_loss() -> None:
    model = small_gpt(dropout=0.1).train()
    idx, targets = tokens(length=16), tokens(length=16, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_from_pretrained_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()  # a name no cache holds, so the local lookup must miss
    with pytest.raises(NetworkError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE is set"):
        GPT.from_pretrained("minigpt-tests/no-such-model")
    assert time.perf_counter() - start < 5


def test_evaluating_turns_dropout_off_and_restores_each_mode_even_after_an_error() -> None:
    training, frozen = small_gpt(dropout=0.5).train(), small_gpt().eval()
    with pytest.raises(RuntimeError, match="boom"), evaluating(training, frozen):
        assert not training.training and not frozen.training
        assert all(not m.training for m in training.modules())  # submodules too: no dropout anywhere
        raise RuntimeError("boom")
    assert training.training and all(m.training for m in training.modules())
    assert not frozen.training


def test_evaluating_nests() -> None:
    model = small_gpt().train()
    with evaluating(model):
        with evaluating(model):
            assert not model.training
        assert not model.training  # the inner block gives back the outer one's mode: eval
    assert model.training


# -- causal=False: a bidirectional model (an encoder, chapter 0) ---------------------------------

@pytest.mark.parametrize("position", ["learned", "rope"])
def test_a_bidirectional_model_reads_later_tokens_and_a_causal_one_does_not(position: str) -> None:
    idx = tokens(length=12)
    later = idx.clone()
    later[:, 6:] = (later[:, 6:] + 1) % SMALL["vocab_size"]  # change every token from position 6 on
    for causal in (True, False):
        model = small_gpt(causal=causal, position=position)
        with torch.no_grad():
            moved = (model(idx)[0] - model(later)[0]).abs().amax(-1)  # (B, T): how far each position's logits moved
        if causal:
            assert (moved[:, :6] == 0).all() and (moved[:, 6:] > 1e-4).all()
        else:
            assert (moved > 1e-4).all()  # position 0 too: it sees the whole input


@pytest.mark.parametrize("length", [1, 7, 32])
def test_naive_equals_sdpa_without_the_causal_mask(length: int) -> None:
    sdpa, naive = small_gpt(attn_impl="sdpa", causal=False), small_gpt(attn_impl="naive", causal=False)
    idx = tokens(length=length)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(idx)[0], naive(idx)[0], atol=1e-5, rtol=1e-5)
        _, _, atts = naive(idx, return_attention=True)
    for att in atts:  # full rows: every query weights every key, and each row sums to 1
        torch.testing.assert_close(att.sum(-1), torch.ones(3, SMALL["n_head"], length))
        assert (att > 0).all()


def test_a_bidirectional_model_has_the_same_parameters_and_refuses_to_generate() -> None:
    causal, encoder = small_gpt(), small_gpt(causal=False)
    assert causal.state_dict().keys() == encoder.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(causal.state_dict().values(), encoder.state_dict().values()))
    assert causal.config.is_gpt2 and not encoder.config.is_gpt2
    idx = tokens(length=8)
    why = r"bidirectional \(causal=False.*no next token to generate"
    with pytest.raises(ValueError, match=why):
        encoder.new_kv_cache(3)
    with pytest.raises(ValueError, match=why):
        encoder(idx, kv_cache=KVCache(2, 3, 4, 32, 16, dtype=torch.float32, device="cpu"))
    with pytest.raises(ValueError, match=why):
        encoder(idx, last_only=True)
    with pytest.raises(ValueError, match=why):
        encoder(idx, attention_mask=torch.ones_like(idx))
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=why):
            generate(encoder, idx, 4, use_cache=use_cache)
    attn = encoder.transformer.h[0].attn
    with pytest.raises(ValueError, match=why):
        attn(torch.randn(3, 8, SMALL["n_embd"]), padding=Padding.of(torch.ones(3, 8, dtype=torch.bool), 8))
    with pytest.raises(ValueError, match=r"GPT-2's block, but this config sets \{'causal': False\}"):
        encoder.to_hf_state_dict()
    with pytest.raises(ValueError, match="causal='yes' must be True"):
        GPTConfig(**SMALL, causal="yes")  # type: ignore[arg-type]
