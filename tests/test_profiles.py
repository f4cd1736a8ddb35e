import pytest

import minigpt
from minigpt.profiles import PROFILES, default_profile_name


def test_env_var_wins(monkeypatch):
    monkeypatch.setenv("MINIGPT_PROFILE", "full")
    monkeypatch.setenv("CI", "true")
    assert minigpt.profile().name == "full"


def test_ci_when_ci_is_set(monkeypatch):
    monkeypatch.delenv("MINIGPT_PROFILE", raising=False)
    monkeypatch.setenv("CI", "true")
    assert default_profile_name() == "ci"


def test_cpu_without_cuda(monkeypatch):
    monkeypatch.delenv("MINIGPT_PROFILE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert default_profile_name() == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert default_profile_name() == "gpu"


def test_overrides_and_errors():
    assert minigpt.profile("ci", n_layer=3).n_layer == 3
    with pytest.raises(ValueError, match="unknown profile 'tiny'"):
        minigpt.profile("tiny")
    with pytest.raises(ValueError, match="n_layers"):
        minigpt.profile("ci", n_layers=3)


@pytest.mark.parametrize("name", list(PROFILES))
def test_profiles_are_consistent(name):
    p = PROFILES[name]
    assert p.n_embd % p.n_head == 0
    assert p.vocab_size > 256
    assert p.dtype in ("float32", "bfloat16")
