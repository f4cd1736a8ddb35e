import re

import pytest
import torch

from minigpt.chat import render
from minigpt.continual import (
    METHODS,
    continual,
    ewc_penalty,
    fisher_diagonal,
    forgetting_table,
    replay_mix,
    without_adapters,
)
from minigpt.lora import apply_lora, merge
from minigpt.model import GPT, GPTConfig
from minigpt.rlhf.run import problems
from minigpt.runs import trained
from minigpt.sft import sft
from minigpt.tasks import arithmetic, comparisons, exact_match


def test_replay_mix_holds_all_new_examples_and_the_asked_share_of_old_ones():
    new, old = [f"b{i}" for i in range(300)], [f"a{i}" for i in range(1000)]
    mixed = replay_mix(new, old, 0.25, seed=1)
    assert len(mixed) == 400 and set(new) <= set(mixed)
    replayed = [x for x in mixed if x.startswith("a")]
    assert len(replayed) == 100 == len(set(replayed))  # a quarter, no repeats while the pool lasts
    assert mixed == replay_mix(new, old, 0.25, seed=1) != replay_mix(new, old, 0.25, seed=2)
    assert mixed[:300] != new  # shuffled: replayed examples spread over the batches
    assert sorted(replay_mix(new, old, 0.0)) == sorted(new)
    assert len([x for x in replay_mix(new, old[:10], 0.5) if x.startswith("a")]) == 300  # drawn again once used up
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        replay_mix(new, old, 1.0)
    with pytest.raises(ValueError, match="no old examples"):
        replay_mix(new, [], 0.5)


def test_comparisons_ask_for_the_larger_of_two_distinct_numbers_split_by_question():
    train, test = comparisons(None, split="train", max_operand=20), comparisons(None, split="test", max_operand=20)
    assert len(train) + len(test) == 21 * 20  # every ordered pair of distinct numbers, once
    assert not {c.prompt[-1].content for c in train} & {c.prompt[-1].content for c in test}
    for c in train:
        a, b = map(int, re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", c.prompt[-1].content).groups())
        assert c.answer == str(max(a, b)) and a != b
    assert comparisons(5, seed=1) == comparisons(5, seed=1) != comparisons(5, seed=2)
    with pytest.raises(ValueError, match="at most"):
        comparisons(len(test) + 1, split="test", max_operand=20)


def test_without_adapters_gives_the_model_back_bit_for_bit():
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)).eval()
    adapted = apply_lora(GPT(base.config), r=2)
    adapted.load_state_dict(base.state_dict(), strict=False)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # a trained-looking adapter
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert not torch.equal(adapted.eval()(idx)[0], base(idx)[0])
        assert torch.equal(without_adapters(adapted)(idx)[0], base(idx)[0])
    merge(adapted)
    with pytest.raises(ValueError, match="unmerge"):
        without_adapters(adapted)
    rows = apply_lora(GPT(base.config), r=2, token_rows=[1, 2])
    with pytest.raises(ValueError, match="token_rows=\\(\\)"):
        without_adapters(rows)


def test_fisher_diagonal_is_the_mean_squared_gradient_of_each_answers_log_likelihood(tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    convs = arithmetic(3, seed=0)
    fisher = fisher_diagonal(model, tok, convs)
    by_hand = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for conv in convs:  # one at a time: log p(answer) = -(sum of the answer tokens' losses)
        ids, mask = render(conv, tok)
        x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
        logp = -torch.nn.functional.cross_entropy(model(x)[0][0], y[0], reduction="none")[torch.tensor(mask[1:]) == 1].sum()
        grads = torch.autograd.grad(logp, list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), grads):
            by_hand[name] += g ** 2 / len(convs)
    assert fisher.keys() == by_hand.keys()
    for name in fisher:
        torch.testing.assert_close(fisher[name], by_hand[name], rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())  # it leaves no gradient behind
    with pytest.raises(ValueError, match="at least one conversation"):
        fisher_diagonal(model, tok, [])


def test_ewc_penalty_is_a_spring_as_stiff_as_the_fisher_information():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=1, n_embd=8))
    fisher = {name: torch.rand_like(p) for name, p in model.named_parameters()}
    penalty = ewc_penalty(model, fisher, strength=3.0)
    assert penalty(model).item() == 0.0  # at the old weights
    moved = GPT(model.config)
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.1 * torch.randn_like(p))
    old = dict(model.named_parameters())
    expected = sum((fisher[n] * (p - old[n]) ** 2).sum() for n, p in moved.named_parameters()) * 3.0 / 2
    torch.testing.assert_close(penalty(moved), expected)
    penalty(moved).backward()  # the gradient points away from the old weights: a step descends back
    for name, p in moved.named_parameters():
        torch.testing.assert_close(p.grad, 3.0 * fisher[name] * (p - old[name]).detach())
    with pytest.raises(ValueError, match="strength"):
        ewc_penalty(model, fisher, strength=-1.0)


def test_a_zero_penalty_trains_bit_for_bit_as_none_and_a_stiff_one_holds_the_weights(ci, tok, tmp_path):
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    convs = arithmetic(64, seed=0)
    fisher = {name: torch.ones_like(p) for name, p in base.named_parameters()}

    def run(out, penalty):
        r = sft(ci, base, tmp_path / out, tokenizer=tok, train=convs, test=convs[:4], progress=False, max_steps=6,
                batch_size=8,
                eval_interval=0, checkpoint_interval=0, sample_interval=0, log_interval=1, penalty=penalty)
        moved = sum((p - q).abs().sum().item() for p, q in zip(r.model.parameters(), base.parameters()))
        return [h["loss"] for h in r.history], [h.get("penalty") for h in r.history], moved

    plain, no_penalty, moved_plain = run("plain", None)
    zero, zero_penalty, moved_zero = run("zero", ewc_penalty(base, fisher, 0.0))
    stiff, stiff_penalty, moved_stiff = run("stiff", ewc_penalty(base, fisher, 1e4))
    assert zero == plain and moved_zero == moved_plain  # the loss logged is the task's, the step the same
    assert no_penalty == [None] * 6 and zero_penalty == [0.0] * 6 and stiff_penalty[-1] > 0
    assert moved_stiff < moved_plain / 2


@pytest.mark.slow
@pytest.mark.outcome
def test_sequential_forgets_replay_and_ewc_forget_less_and_removing_lora_restores_a(ci, tmp_path, outcome):
    results = {r.method: r for r in continual(ci, tmp_path)}
    print(forgetting_table(results.values()))
    assert list(results) == list(METHODS)
    seq, replay, ewc, lora = (results[m] for m in ("sequential", "replay", "ewc", "lora"))
    outcome.check("continual: task A exact match before B", seq.a_before, ">", 0.5)  # spread 0.923 .. 0.987 (6 runs)
    outcome.check("continual: sequential, A after B", seq.a_after, "<", 0.3)  # spread 0.084 .. 0.135 (6 runs)
    outcome.check("continual: replay forgets less (forgetting - sequential's)", replay.forgetting - seq.forgetting,
                  "<", -0.15)  # spread -0.477 .. -0.194 (6 runs)
    outcome.check("continual: EWC forgets less (forgetting - sequential's)", ewc.forgetting - seq.forgetting,
                  "<", -0.1)  # spread -0.735 .. -0.361 (6 runs)
    # Each learned B, from its first evaluation on. Spread over seeds and threads (6 runs each):
    # sequential -1.722 .. -1.048, replay -2.004 .. -1.069, EWC -1.985 .. -0.822, LoRA -1.025 .. -0.642.
    for r, bound in ((seq, -0.8), (replay, -0.9), (ewc, -0.5), (lora, -0.3)):
        val = [h["val_loss"] for h in r.run.history if "val_loss" in h]
        outcome.check(f"continual: {r.method}, B's validation loss change", val[-1] - val[0], "<", bound)
    model_a, tok = trained(ci, "sft")
    restored = without_adapters(lora.run.model)
    assert all(torch.equal(p, q) for p, q in zip(restored.state_dict().values(), model_a.state_dict().values()))
    a_test = problems(ci, "test", ci.continual.n_test_a)
    assert exact_match(restored, tok, a_test) == lora.a_before  # A exactly as before B
