import json
import re
import time

import pytest
import torch

import minigpt.generate
from minigpt.chat import Conversation, render_prompt
from minigpt.errors import NetworkError
from minigpt.model import GPT, GPTConfig
from minigpt.tasks import (
    UNKNOWN,
    alpaca_conversation,
    answers,
    arithmetic,
    confident_answers,
    exact_match,
    few_shot_prompt,
    load_chat_data,
    make_task,
    mixture,
    normalize_answer,
    reliability,
    smoltalk_conversation,
    split_of,
    string_tasks,
    world_qa,
)


def _word(question):
    """The made-up word a string task is about (its split key)."""
    words = question.rstrip(".?").split()
    return words[1] if words[0] == "Write" else words[-1]


def _world(text):
    """A world's facts in a fixed order: the same world, whatever order its system message gives them in."""
    return " ".join(sorted(fact.strip() + "." for fact in text.split(".") if fact.strip()))


def _keys(convs, key):
    return {key(c) for c in convs}


def test_arithmetic_answers_are_right_and_differences_never_negative():
    convs = arithmetic(500, seed=3)
    for c in convs:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", c.messages[0].content).groups()
        assert int(c.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    assert {c.messages[0].content.split()[3] for c in convs} == {"+", "-"}


@pytest.mark.parametrize("make, key", [
    (lambda n, **kw: arithmetic(n, **kw), lambda c: c.messages[0].content),
    (lambda n, **kw: world_qa(n, **kw), lambda c: _world(c.messages[0].content)),
    (lambda n, **kw: world_qa(n, people=1, **kw), lambda c: _world(c.messages[0].content)),  # 5,200 worlds only
    (lambda n, **kw: string_tasks(n, **kw), lambda c: _word(c.messages[0].content)),
])
def test_train_and_test_splits_never_overlap_and_are_deterministic(make, key):
    train = make(1000, split="train", seed=0) + make(1000, split="train", seed=1)
    test = make(100, split="test", seed=0) + make(100, split="test", seed=7)
    assert not _keys(train, key) & _keys(test, key)
    assert all(split_of(k) == "test" for k in _keys(test, key))
    assert make(100, split="test", seed=0) == make(100, split="test", seed=0)
    assert make(100, split="test", seed=0) != make(100, split="test", seed=1)


def test_arithmetic_holds_out_a_tenth_and_enumerates_every_problem():
    train, test = arithmetic(None, split="train"), arithmetic(None, split="test")
    assert len(train) + len(test) == 100 * 100 + 100 * 101 // 2  # sums + non-negative differences
    assert 0.08 < len(test) / (len(train) + len(test)) < 0.12
    with pytest.raises(ValueError, match="has .* problems"):
        arithmetic(len(test) + 1, split="test")
    with pytest.raises(ValueError, match="split="):
        arithmetic(10, split="validation")


def test_world_answers_follow_from_the_facts():
    convs = world_qa(300, seed=1)
    assert any(len(c.messages) == 5 for c in convs) and any(len(c.messages) == 3 for c in convs)
    for c in convs:
        facts = c.messages[0].content
        home = dict(re.findall(r"(\w+) lives in (\w+)\.", facts))
        pet = dict(re.findall(r"(\w+) has (a \w+)\.", facts))
        for q, a in zip(c.messages[1::2], c.messages[2::2]):
            if m := re.fullmatch(r"Where does (\w+) live\?", q.content):
                assert home[m[1]] == a.content
            elif m := re.fullmatch(r"Which pet does (\w+) have\?", q.content):
                assert pet[m[1]] == a.content
            else:
                place = re.fullmatch(r"Who lives in (\w+)\?", q.content)[1]
                assert home[a.content] == place


def test_unanswerable_questions_ask_about_outsiders_and_leave_the_rest_as_they_were():
    """``unanswerable`` turns a share of the questions to people or places the world never
    mentions, answered with UNKNOWN; at 0 the examples are exactly those drawn without it."""
    assert world_qa(200, seed=1) == world_qa(200, seed=1, unanswerable=0.0)
    convs = world_qa(400, seed=1, unanswerable=0.3)
    unknown = known = 0
    for c in convs:
        facts = c.messages[0].content
        for q, a in zip(c.messages[1::2], c.messages[2::2]):
            subject = re.fullmatch(r"(?:Where does|Which pet does|Who lives in) (\w+)(?: live| have)?\?", q.content)[1]
            if a.content == UNKNOWN:
                unknown += 1
                assert subject not in facts  # nobody and nowhere the world describes
            else:
                known += 1
                assert subject in facts
    assert 0.2 < unknown / (unknown + known) < 0.4
    assert all(c.answer == UNKNOWN for c in world_qa(50, seed=2, split="test", unanswerable=1.0))
    with pytest.raises(ValueError, match="unanswerable=1.5"):
        world_qa(5, unanswerable=1.5)


def test_confident_answers_give_the_product_of_the_greedy_tokens_probabilities(tok):
    """Each greedy answer's probability, checked against a plain loop: argmax step by step,
    multiplying the softmax of the chosen token, until <|end|> or the token budget."""
    torch.manual_seed(9)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    end = tok.special_tokens["<|end|>"]
    with torch.no_grad():  # a random model for which <|end|> comes after two tokens in some rows, never in another
        model.lm_head.weight[end] *= 2
    convs = [Conversation.single(f"What is {a} + {b}?", str(a + b)) for a, b in [(1, 2), (30, 4), (37, 48)]]
    got = confident_answers(model, tok, convs, max_new_tokens=6)
    model.eval()
    ended = []
    for conv, (text, prob) in zip(convs, got):
        ids, p, new = render_prompt(conv, tok), 1.0, []
        for _ in range(6):
            with torch.no_grad():
                probs = torch.softmax(model(torch.tensor([ids]))[0][0, -1], -1)
            nxt = int(probs.argmax())
            p *= float(probs[nxt])
            ids, new = ids + [nxt], new + [nxt]
            if nxt == end:
                break
        assert text == tok.decode(new[:-1] if new[-1] == end else new)
        assert prob == pytest.approx(p, rel=1e-4)
        assert 0 < prob <= 1
        ended.append(new[-1] == end)
    assert ended == [True, False, True], ended  # both ways of ending an answer are covered


def test_reliability_bins_confidence_and_weighs_the_calibration_error():
    table, ece = reliability([0.05, 0.15, 0.85, 0.95, 1.0], [False, True, True, True, False], bins=10)
    assert [(row["low"], row["count"]) for row in table] == [(0.0, 1), (0.1, 1), (0.8, 1), (0.9, 2)]
    assert table[-1]["confidence"] == pytest.approx(0.975) and table[-1]["accuracy"] == 0.5
    # |0 - .05| + |1 - .15| + |1 - .85| + 2 * |.5 - .975|, over 5 answers
    assert ece == pytest.approx((0.05 + 0.85 + 0.15 + 2 * 0.475) / 5)
    assert reliability([0.7] * 10, [True] * 7 + [False] * 3)[1] == pytest.approx(0.0)
    table, ece = reliability(torch.tensor([0.2, 0.9]).numpy(), [False, True], bins=2)  # an array in, plain floats out
    assert type(ece) is float and all(type(row["confidence"]) is float for row in table)
    with pytest.raises(ValueError, match="as many confidences as answers"):
        reliability([0.5], [True, False])


def test_string_answers_are_right():
    for c in string_tasks(300, seed=2):
        q, a = c.messages[0].content, c.answer
        word = _word(q)
        if q.startswith("Reverse"):
            assert a == word[::-1]
        elif q.startswith("Write"):
            assert a == word.upper()
        elif q.startswith("How many letters"):
            assert a == str(len(word))
        else:
            letter = re.search(r"letter (\w) appear", q)[1]
            assert a == str(word.count(letter)) and int(a) >= 1


def test_mixture_interleaves_the_tasks():
    convs = mixture(10, seed=0)
    assert len(convs) == 10
    assert convs[0].messages[0].content.startswith("What is")
    assert convs[1].messages[0].role == "system"
    with pytest.raises(ValueError, match="unknown task"):
        make_task("poetry", 3)


def test_normalize_answer():
    assert normalize_answer("  85. ") == "85"
    assert normalize_answer("A  Cat") == "a cat"
    assert normalize_answer("85") != normalize_answer("8 5")


def test_few_shot_prompt_is_plain_text():
    shots = [Conversation.single("What is 1 + 2?", "3"), Conversation.single("What is 5 - 4?", "1")]
    q = Conversation.single("What is 37 + 48?", "85")
    assert few_shot_prompt(shots, q) == (
        "Q: What is 1 + 2?\nA: 3\n\nQ: What is 5 - 4?\nA: 1\n\nQ: What is 37 + 48?\nA:")
    world = Conversation([("system", "Bob has a cat."), ("user", "Which pet does Bob have?"), ("assistant", "a cat")])
    assert few_shot_prompt([], world) == "Bob has a cat.\nQ: Which pet does Bob have?\nA:"


class _Scripted:
    """Stands in for ``minigpt.generate.generate`` (which ``complete`` calls): each prompt (a tuple
    of ids, its left padding removed) continues with scripted tokens."""

    def __init__(self, script, pad):
        self.script, self.pad, self.calls = script, pad, []

    def __call__(self, model, idx, max_new_tokens, *, temperature, stop_tokens, generator=None, attention_mask=None):
        assert temperature == 0.0
        self.calls.append(attention_mask.sum(1).tolist())
        rows = []
        for row, real in zip(idx.tolist(), attention_mask.tolist()):
            prompt = [t for t, r in zip(row, real) if r]
            new = (self.script[tuple(prompt)] + [self.pad] * max_new_tokens)[:max_new_tokens]
            rows.append(row + new)
        return torch.tensor(rows)


def test_exact_match_stops_at_the_end_token_and_batches_prompts_of_any_length(tok, monkeypatch):
    convs = [Conversation.single(f"What is {a} + {b}?", str(a + b)) for a, b in [(1, 2), (30, 4), (37, 48), (2, 2)]]
    end = tok.special_tokens["<|end|>"]
    said = {"3": "3", "34": "34", "85": "86", "4": "4 "}  # one wrong answer; "4 " is right once normalised
    script = {tuple(render_prompt(c, tok)): tok.encode(said[c.answer]) + [end] + tok.encode("99") for c in convs}
    fake = _Scripted(script, end)
    monkeypatch.setattr(minigpt.generate, "generate", fake)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    assert answers(model, tok, convs) == ["3", "34", "86", "4 "]  # cut at <|end|>: the "99" after it is dropped
    lengths = sorted(len(render_prompt(c, tok)) for c in convs)
    assert len(set(lengths)) > 1 and fake.calls == [lengths]  # one left-padded batch, shortest first
    assert exact_match(model, tok, convs) == 0.75


def test_few_shot_answers_stop_at_the_newline(tok, monkeypatch):
    shots = [Conversation.single("What is 1 + 2?", "3")]
    convs = [Conversation.single("What is 37 + 48?", "85"), Conversation.single("What is 3 + 4?", "7")]
    script = {tuple(tok.encode(few_shot_prompt(shots, c))): tok.encode(f" {c.answer}\n\nQ: What") for c in convs}
    monkeypatch.setattr(minigpt.generate, "generate", _Scripted(script, tok.encode("\n")[0]))
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    assert answers(model, tok, convs, few_shot=shots) == [" 85", " 7"]
    assert exact_match(model, tok, convs, few_shot=shots) == 1.0


def test_prompts_that_do_not_fit_the_block_are_refused(tok):
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    shots = arithmetic(5, seed=1)
    with pytest.raises(ValueError, match="fewer few-shot examples"):
        exact_match(model, tok, arithmetic(2, split="test"), few_shot=shots)


def test_alpaca_and_smoltalk_rows_map_to_conversations(tmp_path):
    alpaca = tmp_path / "alpaca_data_cleaned.json"  # the Hub file: one JSON list
    alpaca.write_text(json.dumps([
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    ]))
    convs = load_chat_data("alpaca", data_files=alpaca)
    assert [c.to_dicts() for c in convs] == [
        [{"role": "user", "content": "Give three tips for staying healthy."},
         {"role": "assistant", "content": "1. Eat well."}],
        [{"role": "user", "content": "Translate to French.\n\nGood morning"},
         {"role": "assistant", "content": "Bonjour"}],
    ]
    smol = tmp_path / "smoltalk.jsonl"
    rows = [
        {"messages": [{"content": "Be terse.", "role": "system"}, {"content": "Hi", "role": "user"},
                      {"content": "Hello.", "role": "assistant"}], "source": "systemchats-30k"},
        {"messages": [{"content": "2+2?", "role": "user"}, {"content": "4", "role": "assistant"},
                      {"content": "and 3+3?", "role": "user"}, {"content": "6", "role": "assistant"}],
         "source": "everyday-conversations"},
        {"messages": [{"content": "Hi", "role": "user"}, {"content": "Hi again", "role": "user"}],
         "source": "broken"},
    ]
    smol.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        convs = load_chat_data("smoltalk", data_files=smol)
    assert [c.to_dicts() for c in convs] == [r["messages"] for r in rows[:2]]
    assert smoltalk_conversation(rows[1]).answer == "6"
    assert alpaca_conversation({"instruction": " x ", "input": None, "output": " y "}).to_dicts()[0]["content"] == "x"
    with pytest.raises(ValueError, match="unknown instruction set"):
        load_chat_data("dolly")


def test_online_sets_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(NetworkError, match=r"HuggingFaceTB/smoltalk.*HF_HUB_OFFLINE is set"):
        load_chat_data("smoltalk", limit=10)
    assert time.perf_counter() - start < 5


def test_sample_split_keeps_an_example_found_on_its_last_draw():
    from minigpt.tasks.data import sample_split

    held, kept = (next(f"k{i}" for i in range(100) if split_of(f"k{i}") == s) for s in ("test", "train"))
    draws = iter([held] * (100 * 1 + 1000 - 1) + [kept])  # sample_split draws at most 100 n + 1000 times
    assert sample_split(lambda rng: (key := next(draws), key), 1, "train", 0) == [kept]
