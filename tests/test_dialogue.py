"""The chatterbot dialogue data: read from the pinned wheel, split by opening question, malformed
entries counted and skipped; and pass@k's estimator."""

import pytest

import minigpt.tasks.evaluate
from minigpt import data
from minigpt.chat import Conversation, render
from minigpt.model import GPT, GPTConfig
from minigpt.tasks import dialogue_key, dialogues, parse_dialogue, pass_at_k


@pytest.fixture(scope="module")
def english():
    with pytest.warns(UserWarning, match="skipped 1 malformed"):  # trivia.yml has one entry that is a string
        return dialogues("train"), dialogues("test")


def test_english_dialogue_is_split_by_opening_question(english):
    train, test = english
    # 2,025 well-formed entries, 898 distinct (tech_support.yml repeats ten conversations 1,050 times).
    assert (len(train), len(test)) == (814, 84)
    opening = lambda convs: {dialogue_key(c.messages[0].content) for c in convs}  # noqa: E731
    assert not opening(train) & opening(test)  # no held-out question was seen in training
    assert len(opening(test)) >= 60
    assert any(len(c.messages) > 2 for c in train) and any(len(c.messages) > 2 for c in test)  # multi-turn kept
    assert all(c.messages[-1].role == "assistant" for c in train + test)
    assert len({c.messages for c in train}) == len(train)  # exact duplicates dropped


def test_chinese_dialogue_round_trips(tok):
    train = dialogues("train", language="chinese")
    assert len(train) > 300
    assert any("你" in c.messages[0].content for c in train)
    reply = train[0].messages[1].content  # byte-level BPE: any text survives encode and decode, Chinese too
    ids, mask = render(train[0], tok)
    learned = [i for i, m in zip(ids, mask) if m][:-1]  # the reply's tokens, without <|end|>
    assert tok.decode(learned) == reply and tok.decode(tok.encode(reply)) == reply


def test_unknown_language_and_split_are_refused():
    with pytest.raises(ValueError, match="choose one of .*english"):
        dialogues(language="klingon")
    with pytest.raises(ValueError, match="split="):
        dialogues("validation")


def test_malformed_entries_are_counted_and_yes_stays_text():
    text = """categories:
- test
conversations:
- - Do you like tea?
  - Yes
- - Just one line, nobody answers
- a string, not a list
- - Hello
  - Hi
  - How are you?
- - What is 2 + 2?
  - 4
  - Why?
  - Because.
"""
    convs, bad = parse_dialogue(text)
    assert bad == 2
    assert [c.messages[-1].content for c in convs] == ["Yes", "Hi", "Because."]  # "Yes" not True, "4" not 4
    assert [len(c.messages) for c in convs] == [2, 2, 4]  # an unanswered last turn is dropped
    assert convs[2].messages[1].content == "4"
    with pytest.raises(ValueError, match="no list of conversations"):
        parse_dialogue("categories: [x]\nconversations: 3\n", source="x.yml")
    with pytest.raises(ValueError, match="bad.yml is not valid YAML"):
        parse_dialogue("conversations: [\n", source="bad.yml")


def test_a_corrupt_wheel_is_refused_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path))
    bad = tmp_path / data.CHATTERBOT_WHEEL
    bad.write_bytes(b"not a wheel")
    with pytest.raises(ValueError, match=f"{bad}.*delete it"):
        dialogues()


def test_dialogue_key_ignores_case_spacing_and_final_punctuation():
    assert dialogue_key("Hi,  How is it going?") == dialogue_key("hi, how is it going") == "hi, how is it going"


def test_pass_at_k_is_the_unbiased_estimator(tok, monkeypatch):
    convs = [Conversation.single("What is 1 + 2?", "3"), Conversation.single("What is 2 + 2?", "4")]
    end = tok.special_tokens["<|end|>"]
    said = ["3", "5", "6", "7", "1", "1", "1", "1"]  # 4 samples each: the first question right once, the second never

    def fake(model, prompts, max_new_tokens, **kw):
        assert len(prompts) == 8 and kw["temperature"] == 1.0
        return [tok.encode(s) + [end] for s in said]

    monkeypatch.setattr(minigpt.tasks.evaluate, "complete", fake)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    got = pass_at_k(model, tok, convs, (1, 2, 4), samples=4)
    # question 1: c = 1 of n = 4, pass@k = 1 - C(3, k) / C(4, k): 1/4, 1/2, 1; question 2: 0.
    assert got == pytest.approx({1: 0.125, 2: 0.25, 4: 0.5})
    with pytest.raises(ValueError, match="between 1 and samples=4"):
        pass_at_k(model, tok, convs, (8,), samples=4)
