"""RLHF: guard tests on a tiny random model (exact identities), then outcome tests at ``ci`` size
(each stage really does what it claims, against the true rule or the right answers)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.chat import Conversation, render_prompt
from minigpt.checkpoint import load_checkpoint
from minigpt.model import GPT, GPTConfig
from minigpt.recipe import override
from minigpt.rlhf.core import end_token, pack, prompt_ids, sequence_kl, token_logprobs
from minigpt.rlhf.dpo import DPOConfig, dpo, dpo_loss, sequence_logprobs
from minigpt.rlhf.grpo import GRPOConfig, group_advantages, grpo, grpo_loss, k3_kl
from minigpt.rlhf.ppo import PPOConfig, gae, ppo, ppo_losses
from minigpt.rlhf.reward import (
    Pair,
    RewardModel,
    bradley_terry_loss,
    load_reward_model,
    save_reward_model,
    train_reward_model,
)
from minigpt.tasks import arithmetic, correct, even_digits


@pytest.fixture()
def model(tok):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=48, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()


def _pairs(tok, n=6):
    end = end_token(tok)
    convs = arithmetic(n, max_operand=20)
    return [Pair(tuple(render_prompt(c, tok)), (*tok.encode(c.answer), end), (*tok.encode(c.answer + "7"), end))
            for c in convs]


# --- identities -------------------------------------------------------------------------------


def test_pack_masks_exactly_the_response_targets():
    batch = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert batch.ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    # target t predicts ids[t + 1]: row 0's responses 5, 6 are targets 2, 3; row 1's 7, 8, 9 are 0, 1, 2
    assert batch.mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    assert batch.last.tolist() == [4, 3]


def test_kl_of_the_reference_with_itself_is_zero(model, tok):
    prompts = [render_prompt(c, tok) for c in arithmetic(8, max_operand=20)]
    assert sequence_kl(model, copy.deepcopy(model), prompts, tok, max_new_tokens=4) == 0.0
    x = torch.randn(5, 7)
    assert torch.equal(k3_kl(x, x), torch.zeros(5, 7))
    assert (k3_kl(x, torch.randn(5, 7)) >= 0).all()


def test_logprobs_of_one_forward_pass_equal_those_of_cached_generation(model, tok):
    prompt = render_prompt(arithmetic(1)[0], tok)
    ids = torch.tensor([prompt + tok.encode("1 2 3")])
    full = token_logprobs(model, ids)[0, len(prompt) - 1:]
    cache = model.new_kv_cache(1, ids.size(1))
    stepwise = []
    with torch.no_grad():
        logits, _ = model(ids[:, :len(prompt)], kv_cache=cache, last_only=True)
        for t in range(len(prompt), ids.size(1)):
            stepwise.append(F.log_softmax(logits[0, -1], -1)[ids[0, t]])
            logits, _ = model(ids[:, t:t + 1], kv_cache=cache, last_only=True)
    torch.testing.assert_close(full, torch.stack(stepwise), rtol=1e-5, atol=1e-5)


def test_masked_logprobs_equal_the_full_ones_on_the_mask_with_their_gradients(model, tok):
    convs = arithmetic(3, max_operand=20)
    batch = pack(prompt_ids(convs, tok), [tok.encode("1 2"), tok.encode("3"), tok.encode("4 5 6")])
    policy = copy.deepcopy(model)
    full = token_logprobs(policy, batch.ids, 0.7)
    masked = token_logprobs(policy, batch.ids, 0.7, batch.mask)
    torch.testing.assert_close(masked[batch.mask], full[batch.mask])
    assert (masked[~batch.mask] == 0).all()
    grads = []
    for lp in (full * batch.mask, masked):
        policy.zero_grad()
        lp.sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in policy.parameters()])
    torch.testing.assert_close(grads[0], grads[1])


def test_padding_changes_no_logprob_score_or_loss(model, tok):
    pairs = _pairs(tok, 2)
    short = Pair(pairs[0].prompt, pairs[0].chosen, pairs[0].rejected)
    long = Pair(pairs[1].prompt + (5, 6, 7, 8), pairs[1].chosen + (9, 9, 9), pairs[1].rejected)
    alone = sequence_logprobs(model, [short])
    padded = sequence_logprobs(model, [short, long])  # short is padded to long's length
    torch.testing.assert_close(padded[0][:1], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1][:1], alone[1], rtol=1e-5, atol=1e-5)
    rm = RewardModel(model).eval()
    one = pack([short.prompt], [short.chosen])
    two = pack([short.prompt, long.prompt], [short.chosen, long.chosen])
    torch.testing.assert_close(rm.score(two)[:1], rm.score(one), rtol=1e-5, atol=1e-5)


def test_rl_configs_refuse_a_temperature_they_cannot_take_log_probs_at():
    for make in (PPOConfig, GRPOConfig):  # greedy sampling, then logits / 0: NaN losses
        with pytest.raises(ValueError, match="temperature must be > 0"):
            make(temperature=0.0)


def test_a_reward_model_on_a_body_with_rmsnorm(tok):
    """RMSNorm (chapter 9) has no bias at all, where LayerNorm's may be None."""
    body = GPT(GPTConfig(block_size=48, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, norm="rmsnorm"))
    rm = RewardModel(body).eval()
    assert rm.body.transformer.ln_f.weight.requires_grad and not rm.head.bias.requires_grad
    assert rm.score(pack([[1, 2, 3]], [[4, 5]])).shape == (1,)


def test_gae_equals_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.5, -0.1, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.2, 0.4, 0.3, 9.0]])  # 9.0 sits outside the response: ignored
    mask = torch.tensor([[False, True, True, True, False]])
    gamma, lam = 0.9, 0.8
    r, v = [0.5, -0.1, 1.0], [0.2, 0.4, 0.3]
    d2 = r[2] - v[2]
    d1 = r[1] + gamma * v[2] - v[1]
    d0 = r[0] + gamma * v[1] - v[0]
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, torch.tensor([[0.0, a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, a0 + v[0], a1 + v[1], a2 + v[2], 0.0]]))


def test_losses_and_advantages_by_hand():
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert bradley_terry_loss(c, r).item() == pytest.approx(
        (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2, rel=1e-6)
    losses, rc, rr = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]),
                              torch.tensor([-4.0]), beta=0.1)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-6)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    assert torch.equal(adv[1], torch.zeros(4))  # a group that all agrees teaches nothing
    torch.testing.assert_close(adv[0], (rewards[0] - 0.5) / (rewards[0].std() + 1e-4))
    loo = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 2.0]]), "rloo")
    torch.testing.assert_close(loo[0], torch.tensor([1 - 2 / 3, 0 - 1.0, 0 - 1.0, 2 - 1 / 3]))


def test_ppo_losses_by_hand_and_the_clip():
    """Three response tokens (a fourth, masked, must not count): ratios 1.5, 0.9 and 0.5 with
    cliprange 0.2. Token 0 (ratio above 1.2, positive advantage) is clipped: the min picks the
    clipped term and its gradient is zero. Token 2 left the band too, but downwards with a
    positive advantage, where the unclipped term is the smaller one: it keeps its gradient."""
    mask = torch.tensor([[True, True, True, False]])
    old = torch.zeros(1, 4)
    logprobs = torch.tensor([[math.log(1.5), math.log(0.9), math.log(0.5), 5.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 100.0]])
    values = torch.tensor([[0.5, 1.0, 0.0, 9.0]], requires_grad=True)
    old_values = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 0.0, 0.3, -9.0]])
    pg, vf, stats = ppo_losses(logprobs, old, adv, values, old_values, returns, mask, cliprange=0.2,
                               cliprange_value=0.2)
    # per token max(-A rho, -A clip(rho)): max(-1.5, -1.2), max(0.9, 0.9), max(-1.0, -1.6)
    assert pg.item() == pytest.approx((-1.2 + 0.9 - 1.0) / 3, rel=1e-6)
    # V_clip = 0.2, 0.2, 0.0: max(0.25, 0.64), max(1.0, 0.04), max(0.09, 0.09)
    assert vf.item() == pytest.approx(0.5 * (0.64 + 1.0 + 0.09) / 3, rel=1e-6)
    assert stats["clipfrac"] == pytest.approx(2 / 3)  # tokens 0 and 2 left [0.8, 1.2]
    assert stats["vf_clipfrac"] == pytest.approx(1 / 3)  # only token 0's clipped value term is the larger
    assert stats["approxkl"] == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.9) ** 2 + math.log(0.5) ** 2) / 3)
    assert stats["ratio"] == pytest.approx((1.5 + 0.9 + 0.5) / 3)
    pg.backward()
    # d/d logprob of -A rho / 3 is -A rho / 3; the clipped token and the masked one get none
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.9 / 3, -1.0 / 3, 0.0]]))
    # Inside the band nothing is clipped and the loss is the plain ratio-weighted policy gradient
    same = torch.zeros(1, 4, requires_grad=True)
    pg, _, stats = ppo_losses(same, old, adv, old_values, old_values, returns, mask)
    assert pg.item() == pytest.approx(-(1.0 - 1.0 + 2.0) / 3) and stats["clipfrac"] == 0 and stats["ratio"] == 1


def test_grpo_loss_by_hand_the_clip_and_the_one_update_case():
    """Two answers with advantages +1 and -1, of 2 and 3 tokens: the mean runs over the 5 tokens
    of the batch (token-level), not per answer first."""
    mask = torch.tensor([[True, True, False], [True, True, True]])
    old = torch.zeros(2, 3)
    logprobs = torch.log(torch.tensor([[1.3, 1.0, 1.0], [0.7, 1.0, 1.0]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(logprobs, old, logprobs.detach(), adv, mask, epsilon=0.2, beta=0.0)
    # -min(rho A, clip(rho) A): -min(1.3, 1.2), -1, -min(-0.7, -0.8), 1, 1
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 0.8 + 1.0 + 1.0) / 5, rel=1e-6)
    assert stats["clip_ratio"] == pytest.approx(2 / 5) and stats["kl"] == 0
    loss.backward()
    # the two clipped tokens get no gradient; the others -A rho / N; the masked one none
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.2, 0.0], [0.0, 0.2, 0.2]]))
    # the KL term: k3 per token, beta times its token mean
    ref = torch.full((2, 3), 0.1)
    k3 = math.exp(0.1) - 0.1 - 1
    loss, stats = grpo_loss(torch.zeros(2, 3), old, ref, adv, mask, beta=0.5)
    assert stats["kl"] == pytest.approx(k3, rel=1e-5) and stats["kl_per_completion"] == pytest.approx(2.5 * k3, rel=1e-5)
    assert loss.item() == pytest.approx((-2 * 1.0 + 3 * 1.0) / 5 + 0.5 * k3, rel=1e-5)
    # One update per batch (old = the policy's own log-probs, detached): the ratio is 1, the clip
    # never acts, and the gradient is the policy gradient -A / N per token.
    lp = torch.log(torch.tensor([[0.2, 0.5, 0.9], [0.3, 0.6, 0.1]])).requires_grad_()
    loss, stats = grpo_loss(lp, lp.detach(), lp.detach(), adv[:, None], mask, beta=0.04)
    loss.backward()
    assert stats["clip_ratio"] == 0 and loss.item() == pytest.approx((-2 + 3) / 5)
    torch.testing.assert_close(lp.grad, -adv[:, None] * mask / 5)


def test_reward_model_saves_loads_and_refuses_a_damaged_file(model, tmp_path):
    rm = RewardModel(model)
    with torch.no_grad():
        rm.shift.fill_(0.5), rm.scale.fill_(2.0)
    path = save_reward_model(rm, tmp_path / "rm.safetensors")
    batch = pack([[1, 2, 3]], [[4, 5]])
    torch.testing.assert_close(load_reward_model(path).score(batch), rm.eval().score(batch))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="rm.safetensors"):
        load_reward_model(path)


def _changed(before, module):
    return [n for n, p in module.named_parameters() if p.requires_grad and torch.equal(before[n], p.detach())]


def test_every_trainable_parameter_changes_after_one_step(model, tok):
    pairs = _pairs(tok, 8)
    convs = arithmetic(8, max_operand=20)

    def snapshot(m):
        return {n: p.detach().clone() for n, p in m.named_parameters()}

    rm = RewardModel(model)
    before = snapshot(rm)
    train_reward_model(rm, pairs, steps=1, batch_size=8, warmup_steps=0)
    assert _changed(before, rm) == []

    policy = copy.deepcopy(model)
    before = snapshot(policy)
    dpo(policy, model, pairs, DPOConfig(steps=1, batch_size=8, warmup_steps=0, rpo_alpha=1.0))
    assert _changed(before, policy) == []

    # GRPO with a reward that depends on the answer's length, so every group has a spread.
    policy = copy.deepcopy(model)
    before = snapshot(policy)
    _, hist = grpo(policy, model, tok, convs, lambda c, text: float(len(text)),
                   GRPOConfig(steps=1, prompts_per_step=4, num_generations=4, max_completion_length=4))
    assert hist[0]["frac_reward_zero_std"] < 1 and _changed(before, policy) == []
    # Two updates per batch (num_iterations=2) keep the old log-probs of the first: same samples,
    # same first update, and a second one that moves every parameter further.
    twice = copy.deepcopy(model)
    grpo(twice, model, tok, convs, lambda c, text: float(len(text)),
         GRPOConfig(steps=1, prompts_per_step=4, num_generations=4, max_completion_length=4, num_iterations=2))
    assert _changed(snapshot(policy), twice) == []

    policy = copy.deepcopy(model)
    before, critic_init = snapshot(policy), RewardModel(model)
    _, hist = ppo(policy, model, critic_init, tok, convs,
                  PPOConfig(steps=1, batch_size=8, num_mini_batches=2, num_ppo_epochs=1, response_length=4))
    assert _changed(before, policy) == []
    assert hist[0]["policy/first_ratio"] == 1.0  # the first minibatch is the policy that sampled


# --- outcomes at ci size ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_stage(ci, tmp_path_factory):
    from minigpt.rlhf.run import run_reward

    return run_reward(ci, tmp_path_factory.mktemp("reward"))


@pytest.mark.outcome
def test_ci_reward_model_learns_the_rule(reward_stage, outcome):
    assert reward_stage.summary["test_pairs"] >= 50
    outcome.check("reward model: held-out pair accuracy", reward_stage.summary["pair_accuracy"], ">", 0.95)  # spread 0.983 .. 1.000 (6 runs)


@pytest.mark.outcome
def test_ci_ppo_raises_the_true_reward_on_a_leash(ci, reward_stage, tmp_path, outcome):
    from minigpt.rlhf.run import run_ppo

    s = run_ppo(ci, tmp_path, reward_stage.model).summary
    outcome.check("ppo: true reward gain", s["true_reward_after"] - s["true_reward_before"], ">=", 0.25)  # spread 0.326 .. 0.519 (6 runs)
    outcome.check("ppo: KL to the start (nats)", s["kl"], "<", 5)  # spread 0.652 .. 1.891 (6 runs)
    # The rule ignores whether the sum is right, and so does the policy that learned it.
    outcome.check("ppo: exact match change", s["exact_match"] - s["exact_match_before"], "<", 0)  # spread -0.587 .. -0.168 (6 runs)


@pytest.mark.outcome
def test_ci_dpo_pitfall_and_its_fix(ci, tmp_path, outcome):
    from minigpt.rlhf.run import run_dpo

    plain = run_dpo(ci, tmp_path / "plain", rpo_alpha=None)

    def mean(key, rows):
        return sum(h[key] for h in rows) / len(rows)

    first, last = plain.history[:5], plain.history[-5:]
    # The objective is met: the loss falls as the chosen answers pull ahead of the rejected...
    outcome.check("plain dpo: loss change", mean("loss", last) - mean("loss", first), "<", 0)  # spread -0.285 .. -0.203 (6 runs)
    outcome.check("plain dpo: margin change", mean("rewards/margins", last) - mean("rewards/margins", first),
                  ">", 0)  # spread 0.616 .. 1.293 (6 runs)
    # ...but nothing holds up the right answers themselves, and the NLL term (RPO) is what keeps them.
    rpo = run_dpo(ci, tmp_path / "rpo").summary  # the recipe's default: rpo_alpha=1
    outcome.check("exact match after, dpo+nll minus plain dpo", rpo["exact_match"] - plain.summary["exact_match"],
                  ">", 0.2)  # spread 0.503 .. 0.884 (6 runs)
    outcome.check("dpo+nll: exact match change", rpo["exact_match"] - rpo["exact_match_before"], ">=", 0)  # spread 0.181 .. 0.471 (6 runs)
    outcome.check("dpo+nll: held-out pair accuracy", rpo["pair_accuracy"], ">=", 0.85)  # spread 0.937 .. 0.980 (6 runs)


@pytest.mark.outcome
def test_ci_grpo_raises_the_reward_it_optimises(ci, outcome):
    """GRPO on 16 training problems raises the sampled reward on them, on a short KL leash.

    Measured from the ci start policy (the SFT run's step-120 checkpoint, exact match 0.548): the
    training reward goes 0.30 -> 0.54 at learning rate 5e-4 with k3 KL at most 0.44; at 1e-3 it
    went 0.23 -> 0.59 but one step's KL reached 1.09. Held-out exact match is not asserted: what
    GRPO optimises is the sampled reward, and a model this small barely tells "7 - 3" from "7 - 4"
    (chapter 6; the issue's +0.15 is measured at cpu). A sign error or a broken advantage makes
    this reward fall instead."""
    from minigpt.rlhf.run import problems, start_policy

    reference, tok = start_policy(ci)
    train = problems(ci, "train")[:16]
    cfg = GRPOConfig(steps=60, prompts_per_step=16, learning_rate=5e-4, max_completion_length=6)
    _, history = grpo(copy.deepcopy(reference), reference, tok, train, correct, cfg, seed=ci.seed)
    first, last = history[:5], history[-5:]
    gain = sum(h["reward"] for h in last) / 5 - sum(h["reward"] for h in first) / 5
    outcome.check("grpo: training reward gain", gain, ">", 0.15)  # spread 0.234 .. 0.319 (6 runs)
    outcome.check("grpo: largest k3 KL per token (nats)", max(h["kl"] for h in history), "<", 1)  # spread 0.279 .. 0.519 (6 runs)


def test_rewards_of_the_tasks():
    q = Conversation.single("What is 2 + 2?", "4")
    assert correct(q, " 4 ") == 1.0 and correct(q, "5") == 0.0
    assert even_digits(q, "48") == 1.0 and even_digits(q, "41") == 0.5 and even_digits(q, "no digits") == 0.0


def test_the_sft_run_depends_on_full_sft_and_pretraining_settings_not_lora_or_rl_ones(ci):
    """The RL start policy is a checkpoint of the cached SFT run: a stale one must not be reused."""
    from minigpt.runs import run_info

    before = run_info(ci, "sft")
    assert not run_info(override(ci, {"lora.rank": ci.lora.rank + 1, "rlhf.ppo.steps": 1}), "sft").differences(before)
    for changed in ({"pretrain.steps": ci.pretrain.steps + 1}, {"sft.learning_rate": ci.sft.learning_rate / 2},
                    {"optim.weight_decay": 0.0}, {"seed": ci.seed + 1}):
        after = override(ci, changed)
        # a pretraining setting changes the parent run (its key), the others the SFT run's own settings
        assert run_info(after, "sft").differences(before) or run_info(after, "pretrain").key != run_info(ci, "pretrain").key


def test_the_start_policy_is_the_sft_runs_kept_checkpoint(ci, tmp_path):
    from minigpt.rlhf.run import start_policy
    from minigpt.runs import find_or_make
    from minigpt.train import kept_checkpoint_path

    policy, _ = start_policy(ci)
    step = ci.rlhf.start_step
    kept, state = load_checkpoint(kept_checkpoint_path(find_or_make(ci, "sft"), step))
    assert state["step"] == step
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), kept.state_dict().values(), strict=True))


def test_an_rl_stage_writes_a_run_that_chat_reads(ci, reward_stage, tmp_path):
    """run.json records the stage and its parent, the SFT run, and load_run reads the policy."""
    from minigpt.rlhf.run import run_dpo, run_grpo
    from minigpt.runs import find_or_make, load_run, read_run

    stage = run_grpo(ci, tmp_path, steps=1)
    info = read_run(tmp_path)
    assert (info.stage, info.parent, info.settings["rlhf.grpo.steps"]) == (
        "grpo", read_run(find_or_make(ci, "sft")).key, 1)  # the settings it ran with, overrides included
    assert info.finished and len(stage.history) == 1
    model, _ = load_run(tmp_path)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(model.state_dict().values(), stage.model.state_dict().values()))
    with pytest.raises(ValueError, match=f"{tmp_path} holds a grpo run, which the dpo stage would replace"):
        run_dpo(ci, tmp_path, steps=1)  # refused before it trains: the grpo run is still there
    assert read_run(tmp_path).stage == "grpo" and (tmp_path / "checkpoint.safetensors").exists()
