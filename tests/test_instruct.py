"""The online chat path (GPT-2's weights, an instruction set from the Hub) run offline on stand-ins:
a GPT-2-shaped Hugging Face folder with small random weights, and rows in the Alpaca and SmolTalk
schemas in local JSON files. Same code as online: GPT.from_pretrained, datasets.load_dataset, the
conversion, SFT, the measures, find_or_make."""

import json
import random

import pytest
import torch

import minigpt
from minigpt.chat import CHAT_TOKENS, ChatSession, with_chat_tokens
from minigpt.chatbot import instruct_data, train_instruct
from minigpt.model import GPT
from minigpt.recipe import override
from minigpt.runs import find_or_make, load_run, read_run
from minigpt.tokenizer import gpt2_tokenizer


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, ci):
    """GPT-2's file layout (config.json, model.safetensors) and vocabulary, at a small size."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(ci.seed)  # MINIGPT_TEST_SEED varies the stand-in's weights too
    folder = tmp_path_factory.mktemp("gpt2-standin")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=256)).save_pretrained(folder)
    return folder


def _words(n, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)) for _ in range(n)]


@pytest.fixture(scope="module")
def alpaca_rows(tmp_path_factory):
    """Alpaca's schema, one JSON object per line; a few rows with an input, one that is no conversation."""
    path = tmp_path_factory.mktemp("rows") / "alpaca.jsonl"
    rows = [{"instruction": f"Write {w} in capitals.", "input": "", "output": w.upper()} for w in _words(180)]
    rows += [{"instruction": "Repeat the word.", "input": w, "output": w} for w in _words(20, seed=1)]
    rows.append({"instruction": "A row without an answer", "input": ""})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(ci, gpt2_folder, rows, **fields):
    """The ci recipe on the stand-ins, reading every row (the ci recipe reads the first 200)."""
    fields = {"weights": str(gpt2_folder), "data_files": str(rows), "rows": 1000, **fields}
    return override(ci, {f"instruct.{k}": v for k, v in fields.items()})


def test_the_standin_loads_through_from_pretrained(gpt2_folder):
    from transformers import GPT2LMHeadModel

    ours = GPT.from_pretrained(str(gpt2_folder))
    theirs = GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    idx = torch.tensor([gpt2_tokenizer().encode("Hello, world")])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx)[0], theirs(idx).logits, rtol=1e-4, atol=1e-4)


def test_instruction_rows_split_by_question_and_smoltalk_keeps_its_turns(ci, gpt2_folder, alpaca_rows, tmp_path):
    with pytest.warns(UserWarning, match="skipped 1 of 201 rows"):
        train, test = instruct_data(_recipe(ci, gpt2_folder, alpaca_rows, n_test=1000), with_chat_tokens(gpt2_tokenizer()))
    assert len(train) + len(test) == 200 and 0 < len(test) < 60
    asked = lambda part: {c.messages[0].content for c in part}  # noqa: E731
    assert not asked(train) & asked(test)
    smol = tmp_path / "smol.json"  # SmolTalk's schema, a JSON array
    smol.write_text(json.dumps([{"messages": [{"role": "user", "content": f"Hi {w}"},
                                              {"role": "assistant", "content": "Hello!"},
                                              {"role": "user", "content": "Bye"},
                                              {"role": "assistant", "content": f"Bye, {w}."}]} for w in _words(40)]))
    train, test = instruct_data(_recipe(ci, gpt2_folder, smol, data="smoltalk"), with_chat_tokens(gpt2_tokenizer()))
    assert len(train) + len(test) == 40 and all(len(c.messages) == 4 for c in train + test)


@pytest.mark.outcome
def test_the_gpu_chapter_path_runs_end_to_end_on_the_standins(ci, gpt2_folder, alpaca_rows, outcome):
    """Chapter 5's online cell: find_or_make(R, "instruct"), then a chat with the tuned model."""
    recipe = _recipe(ci, gpt2_folder, alpaca_rows)
    with pytest.warns(UserWarning, match="skipped 1 of 201"):
        folder = find_or_make(recipe, "instruct", say=print)
    info = read_run(folder)
    assert info.finished and info.stage == "instruct" and info.parent is None
    base, tuned = info.extra["base_reply_loss"], info.extra["reply_loss"]
    # Random weights guess over 50,257 ids (ln = 10.8 nats); 20 steps learn the replies' form.
    outcome.check("instruct stand-in: base reply loss", base, ">", 10.0)  # spread 10.847 .. 10.871 (6 runs)
    outcome.check("instruct stand-in: reply loss gain", base - tuned, ">", 1.0)  # spread 3.826 .. 4.143 (6 runs)
    model, tok = load_run(folder)
    assert model.config.vocab_size == tok.vocab_size == 50257 + len(CHAT_TOKENS)  # GPT-2's ids, then the chat tokens
    reply = "".join(ChatSession(model, tok, max_new_tokens=8, seed=0).reply("Write bakedo in capitals."))
    assert isinstance(reply, str)
    assert find_or_make(recipe, "instruct") == folder  # finished: found, not trained again


def test_the_gpu_recipe_trains_the_standin_in_float16_with_the_scaler(gpt2_folder, alpaca_rows, tmp_path):
    """The gpu profile's own recipe (what Colab picks), with only what a CPU needs changed: the device,
    no torch.compile, tiny sizes, and float16 forced, which is what "auto" picks on a T4."""
    recipe = override(minigpt.recipe("gpu"), {
        "device": "cpu", "compile": False, "dtype": "float16", "instruct.weights": str(gpt2_folder),
        "instruct.data_files": str(alpaca_rows), "instruct.rows": 1000, "instruct.steps": 6,
        "instruct.batch_size": 8, "instruct.max_tokens": 96, "instruct.eval_interval": 3, "instruct.n_test": 8})
    with pytest.warns(UserWarning, match="skipped 1 of 201"):
        run = train_instruct(recipe, tmp_path / "run", progress=False)
    assert run.trainer.amp_dtype is torch.float16 and run.trainer.scaler.is_enabled()
    info = read_run(tmp_path / "run")
    assert info.finished and info.profile == "gpu"
    assert info.extra["reply_loss"] < info.extra["base_reply_loss"]
