"""Chapter 14: long addition with place markers, answered directly or with the column addition
written out; the working model learns the trained lengths, the direct one lags behind."""

import dataclasses
import re

import pytest
import torch

from minigpt.chat import Conversation, render_prompt
from minigpt.generate import beam_search
from minigpt.model import GPT
from minigpt.reasoning import (
    ANSWER_MARKER,
    COLUMN_STRIDE,
    FIRST_COLUMN,
    HINTS,
    SLOTS,
    CoupledGPT,
    addition_question,
    addition_working,
    byte_tokenizer,
    correct_final,
    coupled_positions,
    digit_tests,
    direct_answer,
    exact_match_by_digits,
    final_answer,
    grpo_on_working,
    hint_offset,
    hinted_question,
    long_addition,
    reasoning_model,
    train_reasoner,
    with_hints,
)
from minigpt.tasks import split_of


def test_the_working_writes_one_column_per_step_with_its_carries():
    assert with_hints(4721, 0) == "d4c7b2a1" and with_hints(5, 3) == "d5" and with_hints(0, 0) == "a0"
    assert hint_offset(4721, 385) == 0  # the docstrings' example: its units column is marked "a"
    assert hinted_question(4721, 385) == "What is d4c7b2a1 + c3b8a5?"
    assert addition_working(4721, 385) == "a1+5+0=06 b2+8+0=10 c7+3+1=11 d4+0+1=05 Answer: d5c1b0a6"
    assert direct_answer(4721, 385) == "Answer: d5c1b0a6"
    o = hint_offset(99, 1)
    # A carry out of the top column makes one more digit, marked with the next letter.
    assert addition_working(99, 1) == (f"{HINTS[o]}9+1+0=10 {HINTS[o + 1]}9+0+1=10 Answer: "
                                       f"{HINTS[o + 2]}1{HINTS[o + 1]}0{HINTS[o]}0")
    # The shorter number may come first: its missing columns read 0.
    assert addition_working(7, 1995).split(" Answer:")[0].split() == [
        f"{HINTS[hint_offset(7, 1995) + i]}{s}" for i, s in enumerate(["7+5+0=12", "0+9+1=10", "0+9+1=10", "0+1+1=02"])]
    for a, b in [(0, 0), (5, 5), (123456789, 987654321), (10**24, 1)]:
        working = addition_working(a, b)
        assert final_answer(working) == final_answer(direct_answer(a, b)) == str(a + b)
        steps = working.split(f" {ANSWER_MARKER} ")[0].split()
        assert len(steps) == max(len(str(a)), len(str(b))) and all(len(s) == 9 for s in steps)  # one length, any sum


def test_markers_move_with_the_question_and_every_letter_marks_the_units_somewhere():
    # Every offset that leaves room for the digits and a carry: up to 24 for one digit, 23 for two.
    assert {hint_offset(a, b) for a in range(10) for b in range(10)} == set(range(len(HINTS) - 1))
    assert {hint_offset(a, b) for a in range(10, 100) for b in range(100)} == set(range(len(HINTS) - 2))
    assert hint_offset(12, 34) == hint_offset(12, 34) and hint_offset(10**24, 1) == 0
    with pytest.raises(ValueError, match="place markers allow"):
        hint_offset(10**25, 1)
    with pytest.raises(ValueError, match="must be >= 0"):
        with_hints(-3, 0)
    with pytest.raises(ValueError, match="leave room"):
        with_hints(123, len(HINTS) - 2)


def test_final_answer_reads_after_the_marker_and_refuses_what_is_not_a_number():
    assert final_answer("a1+5+0=06 Answer: d5c1b0a6") == "5106"
    assert final_answer("Answer: 12 Answer: b4a2") == "42"  # the last marker counts
    assert final_answer("Answer: 5106") == "5106"
    assert final_answer("Answer: d5c1b0a") == "510"  # cut short: a number, the wrong one
    for bad in ["", "a1+5+0=06", "Answer:", "Answer: d5 c1x0", "Answer: five", "Answer: -3"]:
        assert final_answer(bad) == "", bad
    conv = long_addition(1, digits=3, seed=4)[0]
    assert correct_final(conv, conv.answer) == 1.0 and correct_final(conv, "Answer:") == 0.0
    assert correct_final(conv, "no idea") == 0.0


def test_long_addition_is_split_by_the_plain_question_and_drawn_by_length():
    train = long_addition(3000, digits=4, seed=1)
    test = long_addition(300, split="test", digits=4, seed=1)
    direct = long_addition(300, split="test", digits=4, seed=1, working=False)

    def numbers(c):
        a, b = re.fullmatch(r"What is ([a-z0-9]+) \+ ([a-z0-9]+)\?", c.prompt[-1].content).groups()
        return int(re.sub("[a-z]", "", a)), int(re.sub("[a-z]", "", b))

    pairs = [numbers(c) for c in train]
    assert {split_of(addition_question(a, b)) for a, b in pairs} == {"train"}
    assert {split_of(addition_question(*numbers(c))) for c in test} == {"test"}
    assert not set(pairs) & {numbers(c) for c in test}
    assert [numbers(c) for c in direct] == [numbers(c) for c in test]  # the same questions in both formats
    assert all(c.answer == addition_working(*numbers(c)) and final_answer(c.answer) == str(sum(numbers(c)))
               for c in test)
    lengths = [max(len(str(a)), len(str(b))) for a, b in pairs]
    assert set(lengths) == {1, 2, 3, 4} and lengths.count(4) > 600 and lengths.count(1) <= 90  # 1 digit: 90 sums
    sixes = long_addition(50, split="test", digits=6, min_digits=6, seed=2)
    assert all(max(map(len, map(str, numbers(c)))) == 6 for c in sixes)
    assert long_addition(20, digits=3, seed=5) == long_addition(20, digits=3, seed=5) != long_addition(20, digits=3)
    with pytest.raises(ValueError, match="min_digits <= digits"):
        long_addition(5, digits=2, min_digits=3)
    with pytest.raises(ValueError, match="only find 10 distinct test"):
        long_addition(11, split="test", digits=1)


def test_the_models_block_holds_the_longest_sum_and_scoring_reads_the_final_answer(ci):
    tok = byte_tokenizer()
    assert tok.encode("a1+5") == list(b"a1+5")  # one byte, one token
    model = reasoning_model(ci, tok)
    r = ci.reasoning
    top = 10 ** r.test_digits - 1
    longest = Conversation.single(hinted_question(top, top), addition_working(top, top))
    # the prompt and the reply answers() allows it: the expected one and 4 tokens more
    assert model.config.block_size == len(render_prompt(longest, tok)) + len(tok.encode(longest.answer)) + 4
    assert model.config.position == "rope"
    torch.testing.assert_close(reasoning_model(ci, tok).lm_head.weight, model.lm_head.weight)
    tests = digit_tests(ci)
    assert sorted(tests) == list(range(1, r.test_digits + 1)) and len(tests[1]) == min(10, r.n_test)
    assert all(len(tests[d]) == r.n_test for d in range(2, r.test_digits + 1))
    scores = exact_match_by_digits(model, tok, {2: tests[2][:4]})  # random weights: nothing right
    assert scores == {2: 0.0}
    with pytest.raises(ValueError, match="no test sums of 3 digits"):
        exact_match_by_digits(model, tok, {3: []})


def _texts(conv, tok):
    ids = render_prompt(conv, tok) + tok.encode(conv.answer)
    return [tok.decode([i]) if i not in tok.special_tokens.values() else "" for i in ids]


def test_coupled_positions_put_each_columns_digits_at_the_same_distances_whatever_the_length():
    tok = byte_tokenizer()
    texts = _texts(Conversation.single(hinted_question(4721, 385), addition_working(4721, 385)), tok)
    pos = dict(enumerate(coupled_positions(texts)))
    assert len(pos) == len(texts) and coupled_positions(texts[:20]) == [pos[i] for i in range(20)]  # causal
    # "What is " and the chat token before it count 0, 1, 2, ...; the units column is marked "a" here.
    assert [pos[i] for i in range(9)] == list(range(9)) and texts[9:11] == ["d", "4"]

    def at(column, slot):
        return FIRST_COLUMN + COLUMN_STRIDE * HINTS.index(column) + slot

    assert (pos[9], pos[10]) == (at("d", SLOTS["first"]), at("d", SLOTS["first"] + 1))
    step_a = texts.index("=") - 6  # "a1+5+0=06": the first step's marker
    assert texts[step_a] == "a" and pos[step_a] == at("a", SLOTS["step"])
    assert pos[len(texts) - 2] == at("a", SLOTS["answer"]) and pos[len(texts) - 1] == at("a", SLOTS["answer"] + 1)

    def offsets(a, b):
        """For every digit of the working's steps, how far back its column's question digits are."""
        t = _texts(Conversation.single(hinted_question(a, b), addition_working(a, b)), tok)
        p = coupled_positions(t)
        first_step = next(i for i in range(len(t)) if t[i] in HINTS and t[i - 1] == "")
        return {p[i] - p[j] for i in range(first_step, len(t)) for j in range(first_step)
                if t[i].isdigit() and t[j].isdigit() and (p[i] - FIRST_COLUMN) // COLUMN_STRIDE ==
                (p[j] - FIRST_COLUMN) // COLUMN_STRIDE}

    assert offsets(47, 38) == offsets(84721, 93857)  # five digits: the same distances as two


def test_a_coupled_model_computes_its_positions_when_trained_and_when_generating(ci):
    tok = byte_tokenizer()
    coupled = reasoning_model(ci, tok, coupled=True).eval()
    plain = reasoning_model(ci, tok).eval()  # the same seed: the same weights
    assert isinstance(coupled, CoupledGPT) and not isinstance(plain, CoupledGPT)
    sums = ((4721, 385), (7, 85))
    prompts = [render_prompt(Conversation.single(hinted_question(a, b), ""), tok) for a, b in sums]
    replies = [tok.encode(addition_working(a, b))[:5] for a, b in sums]
    with torch.no_grad():
        x = torch.tensor([prompts[0] + replies[0]])
        assert not torch.allclose(coupled(x)[0], plain(x)[0])  # its own positions, not 0, 1, 2, ...
        expected = torch.tensor(coupled_positions(_texts(Conversation.single(hinted_question(*sums[0]), ""), tok)
                                                  + [tok.decode([i]) for i in replies[0]]))
        torch.testing.assert_close(GPT.forward(coupled, x, positions=expected[None])[0], coupled(x)[0])
        # Left padding and a KV cache, a token at a time, as answers() generates: the same logits.
        longest = max(map(len, prompts))
        idx = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
        mask = (torch.arange(longest)[None] >= torch.tensor([[longest - len(p)] for p in prompts])).long()
        cache = coupled.new_kv_cache(2)
        coupled(idx, kv_cache=cache, attention_mask=mask, last_only=True)
        for j in range(5):
            got = coupled(torch.tensor([[r[j]] for r in replies]), kv_cache=cache, last_only=True)[0][:, -1]
            for row in range(2):
                alone = coupled(torch.tensor([prompts[row] + replies[row][:j + 1]]))[0][0, -1]
                torch.testing.assert_close(got[row], alone, rtol=1e-4, atol=1e-4)
        # Beam search reorders the cache, a beam kept twice included: each row's coupling must go
        # on as its own copy, so the cached search scores exactly what reading each beam anew does.
        prompt = torch.tensor([prompts[0] + replies[0][:2]])
        cached = beam_search(coupled, prompt, 12, num_beams=3)
        fresh = beam_search(coupled, prompt, 12, num_beams=3, use_cache=False)
        assert torch.equal(cached[0], fresh[0]) and cached[1] == pytest.approx(fresh[1], abs=1e-4)
        cache = coupled.new_kv_cache(1)
        GPT.forward(coupled, prompt, kv_cache=cache)  # filled with positions 0, 1, 2, ...
        with pytest.raises(ValueError, match="start from an empty cache"):
            coupled(prompt[:, -1:], kv_cache=cache)
    with pytest.raises(ValueError, match="position='rope'"):
        CoupledGPT(dataclasses.replace(plain.config, position="learned"), tok)


def test_a_coupled_run_loads_as_a_coupled_model(ci, tmp_path):
    from minigpt.runs import load_run, read_run, write_run

    run = train_reasoner(ci, True, tmp_path, coupled=True, max_steps=2)
    model, tok = load_run(tmp_path)  # what `minigpt chat` and load_base read
    assert isinstance(model, CoupledGPT) and read_run(tmp_path).extra["model_class"] == "minigpt.reasoning.CoupledGPT"
    x = torch.tensor([render_prompt(Conversation.single(hinted_question(4721, 385), ""), tok)])
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], run.model.eval()(x)[0], rtol=0, atol=0)
    info = read_run(tmp_path)
    write_run(tmp_path, dataclasses.replace(info, extra={**info.extra, "model_class": "mine.MyGPT"}))
    with pytest.raises(ValueError, match="model class mine.MyGPT, which load_run cannot rebuild"):
        load_run(tmp_path)


def test_the_recipe_refuses_settings_that_cannot_measure_what_the_chapter_asks():
    import minigpt

    with pytest.raises(ValueError, match="must be above reasoning.digits"):
        minigpt.recipe("ci", {"reasoning.test_digits": 2})  # no length past the trained ones
    with pytest.raises(ValueError, match="at most 25"):
        minigpt.recipe("ci", {"reasoning.test_digits": 26})
    with pytest.raises(ValueError, match="grpo_digits"):
        minigpt.recipe("ci", {"reasoning.grpo_digits": (9,)})
    with pytest.raises(ValueError, match="multiple of reasoning.n_head"):
        minigpt.recipe("ci", {"reasoning.n_head": 5})


@pytest.mark.outcome
def test_the_working_learns_the_trained_lengths_and_answering_directly_lags(ci, tmp_path, outcome):
    r = ci.reasoning
    working = train_reasoner(ci, True, tmp_path / "working")
    direct = train_reasoner(ci, False, tmp_path / "direct")
    trained = range(2, r.digits + 1)  # one-digit sums: only 10 held out
    em_working = sum(working.by_digits[d] for d in trained) / len(trained)
    em_direct = sum(direct.by_digits[d] for d in trained) / len(trained)
    outcome.check("reasoning: working, exact match on the trained lengths", em_working,
                  ">=", 0.8)  # spread 0.920 .. 1.000 (6 runs)
    outcome.check("reasoning: working minus direct, the trained lengths", em_working - em_direct,
                  ">=", 0.6)  # spread 0.880 .. 1.000 (6 runs)
    # GRPO from the working model, rewarded for the final answer only, keeps what SFT taught.
    policy, history = grpo_on_working(ci, working)
    assert len(history) >= 1 and all(0 <= h["reward"] <= 1 for h in history)
    after = exact_match_by_digits(policy, working.tokenizer, {d: digit_tests(ci)[d] for d in trained})
    outcome.check("reasoning: working after GRPO, exact match on the trained lengths",
                  sum(after.values()) / len(after), ">=", 0.8)  # spread 0.960 .. 1.000 (6 runs)
    with pytest.raises(ValueError, match="trained on the working"):
        grpo_on_working(ci, direct)
