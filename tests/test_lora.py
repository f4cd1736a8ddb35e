import pytest
import torch
from conftest import perturb_trainable
from safetensors.torch import save_file

from minigpt.checkpoint import load_checkpoint, save_checkpoint
from minigpt.lora import (
    LoRALinear,
    TiedHead,
    TokenRows,
    apply_lora,
    load_lora,
    lora_layers,
    lora_state_dict,
    merge,
    save_lora,
    trainable_fraction,
    unmerge,
)
from minigpt.model import GPT, GPTConfig
from minigpt.train import TrainConfig, Trainer

CONFIG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(CONFIG).eval()


def _idx(seed=1):
    return torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size), generator=torch.Generator().manual_seed(seed))


def _randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


class _Repeat:
    """A BatchSource serving one fixed batch."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def next_batch(self):
        return self.x, self.y

    def reset(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_lora_linear_starts_as_the_base_layer_and_scales_by_alpha_over_r():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8)
    expected = base(x)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.weight is base.weight and layer.scaling == 2.0
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)  # B = 0: exactly the base model
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    torch.testing.assert_close(layer(x), expected + 2.0 * x @ layer.lora_A.t() @ layer.lora_B.t())


def test_apply_lora_freezes_the_base_and_trains_only_adapters():
    model = apply_lora(_model(), targets=("c_attn", "c_fc"), r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.{m}.lora_{ab}" for i in range(2)
                         for m in ("attn.c_attn", "mlp.c_fc") for ab in "AB"}
    n_lora = sum(4 * (32 + out) for out in (96, 128)) * 2
    n_all = sum(p.numel() for p in model.parameters())
    assert trainable_fraction(model) == pytest.approx(n_lora / n_all)
    # The Trainer's optimizer gets the adapters only; a step leaves every base weight as it was.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = _idx()
    trainer = Trainer(model, TrainConfig(max_steps=3, warmup_steps=1, learning_rate=1e-2), _Repeat(x[:, :-1], x[:, 1:]))
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == n_lora
    trainer.train_step()
    trainer.train_step()  # B moves at step 1, so A's gradient is non-zero from step 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_target_names_are_dotted_suffixes():
    both = apply_lora(_model(), targets=("c_proj",))
    assert {n for n, _ in lora_layers(both)} == {f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")}
    attn = apply_lora(_model(), targets=("attn.c_proj",))
    assert {n for n, _ in lora_layers(attn)} == {f"transformer.h.{i}.attn.c_proj" for i in range(2)}
    with pytest.raises(ValueError, match="no nn.Linear matches.*c_attn"):
        apply_lora(_model(), targets=("q_proj",))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(both)


def test_merged_logits_equal_unmerged_and_unmerge_restores_the_weights():
    model = apply_lora(_model(), targets=("c_attn", "c_proj", "c_fc"), r=4, alpha=16)
    _randomize_adapters(model)
    weights = {n: layer.weight.detach().clone() for n, layer in lora_layers(model)}
    x = _idx()
    with torch.no_grad():
        unmerged = model(x)[0]
        merge(model)
        merged = model(x)[0]
        assert all(layer.merged for _, layer in lora_layers(model))
        assert not torch.equal(merged, _model()(x)[0])  # the adapters do change the model
        unmerge(model)
        again = model(x)[0]
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=0, atol=1e-5)
    for n, layer in lora_layers(model):
        torch.testing.assert_close(layer.weight, weights[n], rtol=0, atol=1e-6)


def test_adapters_save_and_load_alone(tmp_path):
    model = apply_lora(_model(), r=4)
    _randomize_adapters(model)
    state = lora_state_dict(model)
    # By default every linear layer of a block has adapters: c_attn, attn.c_proj, c_fc, mlp.c_proj.
    assert all(k.endswith((".lora_A", ".lora_B")) for k in state) and len(state) == 2 * 4 * model.config.n_layer
    path = save_lora(model, tmp_path / "adapters.safetensors")
    assert path.stat().st_size < 20_000  # the adapters, not the model
    fresh = load_lora(apply_lora(_model(), r=4), path)
    x = _idx()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], model(x)[0], rtol=0, atol=0)
    merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        lora_state_dict(model)


def test_loading_adapters_of_another_shape_names_the_file(tmp_path):
    path = save_lora(apply_lora(_model(), r=4), tmp_path / "r4.safetensors")
    with pytest.raises(ValueError, match=r"r4\.safetensors has adapters of other shapes.*r=4"):
        load_lora(apply_lora(_model(), r=8), path)
    with pytest.raises(ValueError, match=r"r4\.safetensors does not fit.*missing"):
        load_lora(apply_lora(_model(), r=4, targets=("c_attn", "c_proj")), path)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_lora(_model(), path)
    other = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match=r"plain\.safetensors is not a minigpt LoRA file"):
        load_lora(apply_lora(_model(), r=4), other)
    with pytest.raises(ValueError, match=r"alpha/r"):
        load_lora(apply_lora(_model(), r=4, alpha=4.0), path)


def test_base_weights_keep_their_names_and_a_lora_checkpoint_round_trips(tmp_path):
    base = _model()
    model = apply_lora(GPT(CONFIG), r=4)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and all(k.endswith((".lora_A", ".lora_B")) for k in missing)
    x = _idx()
    with torch.no_grad():  # adapters start at zero: the base model
        torch.testing.assert_close(model.eval()(x)[0], base(x)[0], rtol=0, atol=0)
    _randomize_adapters(model)
    save_checkpoint(tmp_path / "lora.safetensors", model)  # what Trainer.save writes for a LoRA run
    again = apply_lora(GPT(CONFIG), r=4)
    load_checkpoint(tmp_path / "lora.safetensors", again)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x)[0], model(x)[0], rtol=0, atol=0)


ROWS = (3, 5, 60)
ALSO = ("ln_1", "ln_2", "ln_f", "wpe")


def test_token_rows_start_at_the_base_model_and_the_head_stays_tied():
    base = _model()
    model = apply_lora(_model(), r=4, token_rows=(60, 3, 5, 3), train_also=ALSO)  # order and repeats don't matter
    wte = model.transformer.wte
    assert isinstance(wte, TokenRows) and isinstance(model.lm_head, TiedHead)
    assert wte.token_ids.tolist() == list(ROWS) and wte.delta.shape == (3, CONFIG.n_embd)
    assert model.lm_head.weight is wte.weight  # tied, and saved once as before
    x = _idx()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], base(x)[0], rtol=0, atol=0)  # delta = 0: exactly the base
        wte.delta.copy_(torch.randn(wte.delta.shape, generator=torch.Generator().manual_seed(4)))
        # A plain GPT with the corrected rows in its one tied table: what goes in and what comes out.
        base.transformer.wte.weight[list(ROWS)] += wte.delta
        torch.testing.assert_close(model(x)[0], base(x)[0], rtol=0, atol=1e-5)
        assert not torch.allclose(model(x)[0], _model()(x)[0])


def test_a_step_trains_only_the_rows_adapters_and_train_also():
    model = apply_lora(_model(), r=4, token_rows=ROWS, train_also=("ln_f",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {f"transformer.h.{i}.{m}.lora_{ab}" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") for ab in "AB"}
    assert trainable == adapters | {"transformer.wte.delta", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    table = model.transformer.wte.weight.detach().clone()
    effective = model.transformer.wte.table().detach().clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = _idx()
    trainer = Trainer(model, TrainConfig(max_steps=3, warmup_steps=1, learning_rate=1e-2), _Repeat(x[:, :-1], x[:, 1:]))
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    trainer.train_step()
    trainer.train_step()
    assert torch.equal(model.transformer.wte.weight, table)  # the base embedding, bit for bit
    now = model.transformer.wte.table().detach()
    rows, others = list(ROWS), [i for i in range(CONFIG.vocab_size) if i not in ROWS]
    assert all(not torch.equal(now[i], effective[i]) for i in rows)  # every chosen row moved
    assert torch.equal(now[others], effective[others])  # no other row did
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_trainable_fraction_counts_rows_and_train_also_modules():
    plain = sum(p.numel() for p in _model().parameters())  # the tied table counts once
    model = apply_lora(_model(), r=4, token_rows=ROWS, train_also=ALSO)
    # (in, out) of c_attn, attn.c_proj, c_fc and mlp.c_proj in each of 2 blocks, at rank 4
    n_lora = 2 * sum(4 * (i + o) for i, o in ((32, 96), (32, 32), (32, 128), (128, 32)))
    n_also = (2 * 2 * 2 + 2) * 32 + CONFIG.block_size * 32  # ln_1, ln_2 per block and ln_f; wpe
    n_all = plain + n_lora + 3 * 32  # the rows' delta is a parameter of its own
    assert trainable_fraction(model) == pytest.approx((n_lora + 3 * 32 + n_also) / n_all)


def test_merged_token_rows_give_the_same_logits_and_unmerge_restores_them():
    model = apply_lora(_model(), r=4, token_rows=ROWS, train_also=ALSO)
    perturb_trainable(model)
    table = model.transformer.wte.weight.detach().clone()
    weights = {n: layer.weight.detach().clone() for n, layer in lora_layers(model)}
    x = _idx()
    with torch.no_grad():
        unmerged = model(x)[0]
        merge(model)
        assert model.transformer.wte.merged and model.lm_head.weight is model.transformer.wte.weight
        torch.testing.assert_close(model.transformer.wte.weight[list(ROWS)],
                                   table[list(ROWS)] + model.transformer.wte.delta)
        torch.testing.assert_close(model(x)[0], unmerged, rtol=0, atol=1e-5)
        unmerge(model)
        torch.testing.assert_close(model(x)[0], unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.transformer.wte.weight, table, rtol=0, atol=1e-6)
    for n, layer in lora_layers(model):
        torch.testing.assert_close(layer.weight, weights[n], rtol=0, atol=1e-6)


def test_token_rows_and_train_also_save_and_load(tmp_path):
    model = apply_lora(_model(), r=4, token_rows=ROWS, train_also=ALSO)
    perturb_trainable(model)
    state = lora_state_dict(model)
    assert {"transformer.wte.delta", "transformer.wte.token_ids", "transformer.wpe.weight",
            "transformer.ln_f.weight", "transformer.h.1.ln_2.bias"} <= set(state)
    assert "transformer.wte.weight" not in state and "lm_head.weight" not in state  # the frozen table stays out
    path = save_lora(model, tmp_path / "rows.safetensors")
    fresh = load_lora(apply_lora(_model(), r=4, token_rows=ROWS, train_also=ALSO), path)
    x = _idx()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], model(x)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"rows\.safetensors does not fit.*token_rows"):
        load_lora(apply_lora(_model(), r=4, train_also=ALSO), path)
    with pytest.raises(ValueError, match=r"rows\.safetensors does not fit.*unexpected.*ln_1"):
        load_lora(apply_lora(_model(), r=4, token_rows=ROWS), path)


def test_token_rows_and_train_also_refuse_what_they_cannot_do():
    for bad in ((64,), (-1,), (3, 64)):
        with pytest.raises(ValueError, match=r"token_rows must be token ids in \[0, 64\)"):
            apply_lora(_model(), token_rows=bad)
    for name in ("wte", "lm_head", "transformer"):  # each holds the tied embedding
        with pytest.raises(ValueError, match=f"train_also cannot name (transformer\\.)?{name}:.*token_rows"):
            apply_lora(_model(), token_rows=ROWS, train_also=(name,))
    with pytest.raises(ValueError, match="train_also cannot name transformer.wte"):
        apply_lora(_model(), train_also=("wte",))
    with pytest.raises(ValueError, match=r"no module matches train_also \['ln_3'\]"):
        apply_lora(_model(), train_also=("ln_3",))
    untied = _model()
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="tied to its output head"):
        apply_lora(untied, token_rows=ROWS)
    assert not list(lora_layers(untied)) and all(p.requires_grad for p in untied.parameters())  # left as it was
    # The tied head as a target: its merged update would change the embedding too.
    for rows in ((), ROWS):
        with pytest.raises(ValueError, match="LoRA cannot adapt lm_head: its weight is the token embedding"):
            apply_lora(_model(), targets=("c_attn", "lm_head"), token_rows=rows)
    untied = apply_lora(untied, targets=("lm_head",), r=2)  # an untied head is an ordinary linear layer
    with torch.no_grad():
        untied.lm_head.lora_B.normal_()
        x = torch.randint(64, (1, 8))
        adapted = untied(x)[0]
        merge(untied)
        torch.testing.assert_close(untied(x)[0], adapted, rtol=1e-5, atol=1e-5)


def test_adapters_are_not_decayed_but_token_rows_and_plain_weights_are():
    from minigpt.train import make_optimizer

    model = apply_lora(_model(), r=2, alpha=4.0, token_rows=[1, 2], train_also=("ln_f",))
    groups = make_optimizer(model, TrainConfig(weight_decay=0.1), "cpu").param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    adapters = [n for n in names.values() if n.endswith(("lora_A", "lora_B"))]
    assert adapters and not any(id(p) in decayed for n, p in model.named_parameters() if n in adapters)
    assert sorted(names[i] for i in decayed) == ["transformer.wte.delta"]  # decays towards the pretrained rows
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    plain = GPT(CONFIG)  # without adapters every matrix decays, as before
    decayed = {id(p) for g in make_optimizer(plain, TrainConfig(), "cpu").param_groups if g["weight_decay"] > 0
               for p in g["params"]}
    assert {n for n, p in plain.named_parameters() if id(p) in decayed} == \
        {n for n, p in plain.named_parameters() if p.dim() >= 2}
