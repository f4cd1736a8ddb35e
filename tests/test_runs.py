"""Runs: a cached stage is reused only when its settings, parent and code match, and says why not."""

import json

import pytest
import torch

import minigpt
from minigpt import runs
from minigpt.pretrain import pretrain
from minigpt.recipe import override
from minigpt.runs import code_digest, find_or_make, load_run, read_run, trained

TINY = {"pretrain.steps": 4, "pretrain.eval_interval": 2, "pretrain.warmup_steps": 1,
        "tokenizer.corpus_chars": 20_000, "tokenizer.vocab_size": 300}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path))
    return tmp_path


def test_a_stage_digests_its_own_code_and_what_it_imports_not_what_follows_it():
    pretrain_digest, pretrain_modules = code_digest("minigpt.pretrain")
    sft_digest, sft_modules = code_digest("minigpt.sft")
    assert {"minigpt.pretrain", "minigpt.train", "minigpt.model", "minigpt.data"} <= set(pretrain_modules)
    assert "minigpt.sft" not in pretrain_modules and "minigpt.sft" in sft_modules
    assert "minigpt.recipe" not in sft_modules  # settings are compared by value, not by source
    assert pretrain_digest != sft_digest


def test_one_changed_line_of_sft_changes_its_digest_not_pretrainings(tmp_path, monkeypatch):
    before = {m: code_digest(m)[0] for m in ("minigpt.pretrain", "minigpt.sft")}
    original = runs._module_file
    edited = tmp_path / "sft.py"
    monkeypatch.setattr(runs, "_module_file", lambda name: edited if name == "minigpt.sft" else original(name))
    source = original("minigpt.sft").read_text()
    # prose is not code: a comment, a mended docstring or a reflowed line retrain nothing
    edited.write_text(source.replace('"""', '"""Mended. ', 1).replace("\nimport ", "\n# a comment\nimport ", 1))
    assert code_digest("minigpt.sft")[0] == before["minigpt.sft"]
    edited.write_text(source + "\nONE_MORE_LINE = 1\n")
    assert code_digest("minigpt.pretrain")[0] == before["minigpt.pretrain"]
    assert code_digest("minigpt.sft")[0] != before["minigpt.sft"]


def test_find_or_make_reuses_a_matching_run_and_retrains_a_changed_one_saying_why(cache, monkeypatch, capsys):
    r = minigpt.recipe("ci", TINY)
    folder = find_or_make(r, "pretrain")
    assert "no cached run yet" in capsys.readouterr().out
    info = read_run(folder)
    assert info.stage == "pretrain" and info.finished and info.settings["pretrain.steps"] == 4
    metrics = (folder / "metrics.jsonl").read_text()
    assert find_or_make(r, "pretrain") == folder and (folder / "metrics.jsonl").read_text() == metrics
    assert capsys.readouterr().out == ""  # reused, silently
    model, tok = trained(r, "pretrain")
    assert not model.training and tok.encode("To be") == tok.encode("To be")

    find_or_make(override(r, {"pretrain.steps": 5}), "pretrain")
    assert "training again, because the cached run differs: pretrain.steps: 4 -> 5" in capsys.readouterr().out
    assert read_run(folder).settings["pretrain.steps"] == 5
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 5  # from scratch, not appended to the old run's lines

    real = runs.code_digest
    monkeypatch.setattr(runs, "code_digest", lambda m: ("0" * 16, real(m)[1]))
    find_or_make(override(r, {"pretrain.steps": 5}), "pretrain")
    assert "the code changed" in capsys.readouterr().out


def test_a_changed_parent_retrains_what_starts_from_it(cache, capsys):
    r = minigpt.recipe("ci", {**TINY, "sft.steps": 6, "sft.keep_steps": "3", "rlhf.start_step": 3,
                              "sft.eval_interval": 3, "sft.warmup_steps": 1})
    sft_folder = find_or_make(r, "sft")
    assert read_run(sft_folder).parent == read_run(find_or_make(r, "pretrain")).key
    capsys.readouterr()
    find_or_make(override(r, {"pretrain.learning_rate": 1e-3}), "sft")
    said = capsys.readouterr().out
    assert "pretrain (ci): training again" in said and "sft (ci): training again" in said
    assert "the run it starts from changed" in said
    model, _ = load_run(sft_folder, step=3)
    assert isinstance(model, torch.nn.Module)
    with pytest.raises(FileNotFoundError, match="keeps no checkpoint of step 4"):
        load_run(sft_folder, step=4)


def test_a_folder_of_another_run_is_refused_or_started_over_never_mixed(cache, tmp_path, capsys):
    r = minigpt.recipe("ci", TINY)
    out = tmp_path / "run"
    pretrain(r, out, progress=False)
    other = override(r, {"tokenizer.vocab_size": 280})
    with pytest.raises(ValueError, match=r"holds a run made otherwise \(tokenizer.vocab_size: 300 -> 280\).*--restart"):
        pretrain(other, out, progress=False)
    trainer = pretrain(other, out, resume=False, progress=False)  # --restart: a new tokenizer and new shards
    _, tok = load_run(out)
    assert tok.vocab_size == 280 and trainer.raw_model.config.vocab_size == 280


def test_what_is_not_a_run_is_refused_with_its_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a run folder"):
        load_run(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'run.json'} is damaged"):
        read_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"stage": "sft"}))
    with pytest.raises(ValueError, match="is not a 'minigpt-run 1' file"):
        read_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"format": "minigpt-run 1", "stgae": "sft"}))  # a key damaged
    with pytest.raises(ValueError, match=f"{tmp_path / 'run.json'} is damaged .*stgae"):
        read_run(tmp_path)
