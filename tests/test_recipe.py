"""The recipes: which one is chosen, how a field is overridden, and that each is consistent."""

import dataclasses

import pytest

import minigpt
from minigpt.cli import main, split_overrides
from minigpt.recipe import RECIPES, default_recipe_name, flatten, override
from minigpt.rlhf.ppo import PPOConfig


def test_env_var_wins(monkeypatch):
    monkeypatch.setenv("MINIGPT_PROFILE", "full")
    monkeypatch.setenv("CI", "true")
    assert minigpt.recipe().name == "full"


def test_ci_when_ci_is_set(monkeypatch):
    monkeypatch.delenv("MINIGPT_PROFILE", raising=False)
    monkeypatch.setenv("CI", "true")
    assert default_recipe_name() == "ci"


def test_cpu_without_cuda(monkeypatch):
    monkeypatch.delenv("MINIGPT_PROFILE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert default_recipe_name() == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert default_recipe_name() == "gpu"


def test_overrides_by_dotted_path_parse_strings_by_the_fields_type():
    r = minigpt.recipe("ci", {"model.n_layer": 3, "sft.learning_rate": "1e-3", "rlhf.ppo.kl_coef": "0.2",
                              "sft.keep_steps": "100, 120", "sft.n_test": "none", "compile": "true"}, seed=2)
    assert (r.model.n_layer, r.sft.learning_rate, r.rlhf.ppo.kl_coef) == (3, 1e-3, 0.2)
    assert (r.sft.keep_steps, r.sft.n_test, r.compile, r.seed) == ((100, 120), None, True, 2)
    assert RECIPES["ci"].model.n_layer == 2  # the named recipe itself is untouched
    assert override(PPOConfig(), {"steps": "7"}).steps == 7  # any frozen settings tree
    printed = minigpt.recipe("ci", {"sft.keep_steps": "(100, 120)", "lora.train_also": "('ln_1', 'ln_f')"})
    assert (printed.sft.keep_steps, printed.lora.train_also) == ((100, 120), ("ln_1", "ln_f"))  # as `recipe` prints


@pytest.mark.parametrize("changes, message", [
    ({"model.n_layers": 3}, "ModelRecipe has no field 'n_layers'; it has n_layer, n_head"),
    ({"sft": 3}, "'sft' is a section; set one of its fields, such as sft.base"),
    ({"sft.steps.x": 3}, "steps is a value, not a section"),
    ({"sft.steps": "many"}, "sft.steps='many' is not a valid int"),
    ({"rlhf.grpo.advantage": "ppo"}, "rlhf.grpo.advantage='ppo' must be one of 'grpo', 'rloo'"),
    ({"model.n_head": 3}, "model.n_embd=64 must be a multiple of model.n_head=3"),
    ({"rlhf.start_step": 5}, r"rlhf.start_step=5 must be one of sft.keep_steps=\(120,\)"),
])
def test_bad_overrides_say_what_to_do(changes, message):
    with pytest.raises(ValueError, match=message):
        minigpt.recipe("ci", changes)


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown profile 'tiny'; choose one of ci, cpu, gpu, full"):
        minigpt.recipe("tiny")


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_are_consistent_and_frozen(name):
    r = RECIPES[name]
    assert r.name == name and r.tokenizer.vocab_size > 256
    assert r.pretrain.total_batch_tokens % (r.pretrain.batch_size * r.model.block_size) == 0
    assert all(0 < s < r.sft.steps for s in r.sft.keep_steps)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.sft.steps = 1  # type: ignore[misc]
    paths = [path for path, _ in flatten(r)]
    assert len(paths) == len(set(paths)) > 80 and "rlhf.ppo.kl_coef" in paths


def test_the_command_line_takes_any_field_and_prints_the_recipe(capsys):
    assert split_overrides(["sft", "--sft.steps", "3", "--lora.rank=2", "--seed", "4", "--out", "x"]) == (
        ["sft", "--out", "x"], {"sft.steps": "3", "lora.rank": "2", "seed": "4"})
    assert main(["recipe", "--profile", "ci", "--rlhf.dpo.beta", "0.3", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert "rlhf.dpo.beta = 0.3" in printed and "seed = 7" in printed and "vision.patch = 2" in printed
    assert main(["recipe", "--profile", "ci", "--sft.stepz", "3"]) == 2
    assert "SFTRecipe has no field 'stepz'" in capsys.readouterr().err
    assert main(["pretrain", "--profile", "ci", "--train.nope", "1"]) == 2
    assert "unknown --train.nope" in capsys.readouterr().err
    assert main(["recipe", "--sft.steps"]) == 2
    assert "--sft.steps needs a value" in capsys.readouterr().err
