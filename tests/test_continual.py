import pytest
import torch

from minigpt.continual import (
    METHODS,
    continual,
    forgetting_table,
    replay_mix,
    without_adapters,
)
from minigpt.lora import apply_lora, merge
from minigpt.model import GPT, GPTConfig
from minigpt.rlhf.run import problems
from minigpt.runs import trained
from minigpt.tasks import SENTIMENTS, exact_match, review_questions, reviews


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


def test_review_questions_ask_for_the_reviews_label():
    convs, labeled = review_questions(100, seed=2), reviews(100, seed=2, max_clauses=2)
    assert [c.answer for c in convs] == [SENTIMENTS[e.label] for e in labeled]
    assert all(c.prompt[-1].content == f"{e.text} Positive, negative or mixed?" for c, e in zip(convs, labeled))
    assert max(e.text.count(",") for e in labeled) == 1  # at most two clauses


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


@pytest.mark.slow
@pytest.mark.outcome
def test_sequential_forgets_replay_forgets_less_and_removing_lora_restores_a(ci, tmp_path, outcome):
    results = {r.method: r for r in continual(ci, tmp_path)}
    print(forgetting_table(results.values()))
    assert list(results) == list(METHODS)
    seq, replay, lora = results["sequential"], results["replay"], results["lora"]
    outcome.check("continual: task A exact match before B", seq.a_before, ">", 0.5)  # spread 0.923 .. 0.987 (5 runs)
    outcome.check("continual: sequential, A after B", seq.a_after, "<", 0.2)  # spread 0.000 .. 0.084 (5 runs)
    outcome.check("continual: replay forgets less (forgetting - sequential's)", replay.forgetting - seq.forgetting,
                  "<", -0.15)  # spread -0.819 .. -0.335 (5 runs)
    # Each learned B, from its first evaluation on. Spread over seeds and threads (5 runs each):
    # sequential -6.742 .. -3.521, replay -5.430 .. -3.311, LoRA -0.928 .. -0.530.
    for r, bound in ((seq, -1.0), (replay, -1.0), (lora, -0.3)):
        val = [h["val_loss"] for h in r.run.history if "val_loss" in h]
        outcome.check(f"continual: {r.method}, B's validation loss change", val[-1] - val[0], "<", bound)
    model_a, tok = trained(ci, "sft")
    restored = without_adapters(lora.run.model)
    assert all(torch.equal(p, q) for p, q in zip(restored.state_dict().values(), model_a.state_dict().values()))
    a_test = problems(ci, "test", ci.continual.n_test_a)
    assert exact_match(restored, tok, a_test) == lora.a_before  # A exactly as before B
