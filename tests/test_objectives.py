"""BERT's masked-LM corruption, the batches of both objectives, the three questions of chapter 0,
and (outcome) that a masked model asked for the next token does worse than a causal one."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt.model import GPT, GPTConfig
from minigpt.objectives import (
    MASK_SHARE,
    RANDOM_SHARE,
    TextWindows,
    compare_objectives,
    held_out_windows,
    mask_tokens,
    objectives_config,
    score_objectives,
)


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """``count`` of ``n`` Bernoulli(p) draws is within ``sigmas`` standard deviations of n p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_mask_tokens_chooses_15_percent_and_splits_them_80_10_10() -> None:
    vocab, mask_id, rate = 1000, 1000, 0.15
    idx = torch.randint(vocab, (400, 500), generator=torch.Generator().manual_seed(0))
    inputs, targets = mask_tokens(idx, mask_id, vocab, rate, torch.Generator().manual_seed(1))
    assert inputs.shape == targets.shape == idx.shape and inputs.dtype == targets.dtype == idx.dtype
    chosen = targets != -100
    n, k = idx.numel(), int(chosen.sum())
    assert within(k, n, rate)
    masked = inputs == mask_id
    replaced = chosen & ~masked & (inputs != idx)  # a random id that happens to equal the token stays "unchanged"
    kept = chosen & (inputs == idx)
    assert within(int(masked.sum()), k, MASK_SHARE)
    assert within(int(replaced.sum()), k, RANDOM_SHARE * (1 - 1 / vocab))
    assert within(int(kept.sum()), k, 1 - MASK_SHARE - RANDOM_SHARE * (1 - 1 / vocab))
    # Nothing outside the chosen positions changes, and the targets there are the original tokens.
    assert torch.equal(inputs[~chosen], idx[~chosen]) and torch.equal(targets[chosen], idx[chosen])
    assert not (masked & ~chosen).any() and int(inputs[~masked].max()) < vocab  # random ids never the mask


def test_targets_are_minus_100_exactly_where_the_first_draw_did_not_choose() -> None:
    """The documented draw order: the first ``torch.rand`` of the generator picks the positions."""
    idx = torch.randint(50, (64, 32), generator=torch.Generator().manual_seed(3))
    _, targets = mask_tokens(idx, 50, 50, 0.3, torch.Generator().manual_seed(7))
    chosen = torch.rand(idx.shape, generator=torch.Generator().manual_seed(7)) < 0.3
    assert torch.equal(targets != -100, chosen)
    assert (targets[~chosen] == -100).all()
    # rate 1: every position is asked for
    _, every = mask_tokens(idx, 50, 50, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(every, idx)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, float("nan")])
def test_mask_tokens_refuses_a_rate_outside_0_1(rate: float) -> None:
    with pytest.raises(ValueError, match=r"rate=.* must be in \(0, 1\]"):
        mask_tokens(torch.zeros(4, 4, dtype=torch.long), 9, 9, rate)


def test_mask_tokens_refuses_floats_and_an_empty_vocabulary() -> None:
    with pytest.raises(ValueError, match="integer token ids"):
        mask_tokens(torch.zeros(4, 4), 9, 9)
    with pytest.raises(ValueError, match="vocab_size=0"):
        mask_tokens(torch.zeros(4, 4, dtype=torch.long), 9, 0)


def test_both_objectives_read_the_same_windows() -> None:
    data = torch.arange(1000) % 97
    causal = TextWindows(data, 16, 8, "causal", seed=5)
    masked = TextWindows(data, 16, 8, "masked", mask_id=97, vocab_size=97, seed=5)
    for _ in range(3):
        x, y = causal.next_batch()
        xm, ym = masked.next_batch()
        assert x.shape == y.shape == xm.shape == ym.shape == (8, 16)
        assert torch.equal(y[:, :-1], x[:, 1:])  # the next tokens
        chosen = ym != -100
        assert torch.equal(ym[chosen], x[chosen]) and torch.equal(xm[~chosen], x[~chosen])
    state = masked.state_dict()
    again = TextWindows(data, 16, 8, "masked", mask_id=97, vocab_size=97, seed=5)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), masked.next_batch()))
    masked.reset()
    assert masked.index == 0
    with pytest.raises(ValueError, match="seed=1, but this source has seed=5"):
        masked.load_state_dict({"index": 0, "seed": 1})


def test_text_windows_say_what_they_need() -> None:
    data = torch.arange(100)
    with pytest.raises(ValueError, match="needs mask_id and vocab_size"):
        TextWindows(data, 16, 8, "masked")
    with pytest.raises(ValueError, match="objective='prefix' must be"):
        TextWindows(data, 16, 8, "prefix")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than block_size"):
        TextWindows(data[:10], 16, 8)


def test_held_out_windows_are_evenly_spaced_and_fixed() -> None:
    data = torch.arange(100)
    w = held_out_windows(data, 10, 4)
    assert w[:, 0].tolist() == [0, 30, 60, 90] and torch.equal(w[-1], torch.arange(90, 100))
    assert held_out_windows(data, 10, 1000).shape == (91, 10)  # no more windows than there are starts
    with pytest.raises(ValueError, match="hold no window"):
        held_out_windows(data[:5], 10, 4)


def test_score_objectives_asks_the_three_questions() -> None:
    torch.manual_seed(0)
    small = dict(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16)
    causal, masked = GPT(GPTConfig(**small)), GPT(GPTConfig(**small, causal=False))  # type: ignore[arg-type]
    windows = torch.randint(11, (20, 8))
    s = score_objectives(causal, masked, windows, mask_id=11)
    assert s.position == 4 and s.n == 20
    # by hand: the same three argmaxes
    truth = windows[:, 4]
    both = windows.clone()
    both[:, 4] = 11
    with torch.no_grad():
        a = masked(both)[0][:, 4].argmax(-1)
        b = causal(windows)[0][:, 3].argmax(-1)  # causal: the tokens after 3 change nothing
        c = masked(torch.cat([windows[:, :4], torch.full((20, 1), 11)], 1))[0][:, -1].argmax(-1)
    assert [s.masked_both_sides, s.causal_next, s.masked_left_only] == [
        (g == truth).float().mean().item() for g in (a, b, c)]
    with pytest.raises(ValueError, match="a causal model"):
        score_objectives(masked, causal, windows, mask_id=11)
    with pytest.raises(ValueError, match="position=0"):
        score_objectives(causal, masked, windows, mask_id=11, position=0)


def test_the_chapter_models_differ_only_in_the_mask(ci) -> None:
    a, b = objectives_config(ci, 70, causal=True), objectives_config(ci, 70, causal=False)
    assert a.causal and not b.causal
    assert {k: v for k, v in vars(a).items() if k != "causal"} == {k: v for k, v in vars(b).items() if k != "causal"}
    torch.manual_seed(0)
    sa = GPT(a).state_dict()
    torch.manual_seed(0)
    sb = GPT(b).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same names, same start


@pytest.mark.slow
@pytest.mark.outcome
def test_a_masked_model_asked_for_the_next_token_does_worse_than_a_causal_one(ci, outcome) -> None:
    """Chapter 0's comparison at `ci` (about 10 s): the same model trained both ways on the same
    characters. Asked for the next token with only the left context, the masked-LM model falls well
    below the causal model, and below what it does itself when it sees both sides. The spreads are
    over seeds 1337, 0, 1 and 2 at 1 and 2 threads (bench/outcome_spread.py --seeds 1337 0 1 2);
    the thread count changed no value at this size."""
    run = compare_objectives(ci)
    s = run.scores
    print(s, run.seconds)
    assert s.n == ci.objectives.n_test and s.position == ci.objectives.block_size // 2
    outcome.check("objectives: causal next-token accuracy", s.causal_next, ">", 0.25)  # spread 0.350 .. 0.359 (6 runs)
    outcome.check("objectives: causal minus masked-LM left-only accuracy", s.causal_next - s.masked_left_only,
                  ">", 0.08)  # spread 0.131 .. 0.155 (6 runs)
    outcome.check("objectives: masked-LM both sides minus left-only accuracy", s.masked_both_sides - s.masked_left_only,
                  ">", 0.04)  # spread 0.105 .. 0.131 (6 runs)
