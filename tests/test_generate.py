"""Generation: the KV cache changes speed, never tokens; each filter matches a hand computation."""

from __future__ import annotations

import pytest
import torch

import minigpt.generate
from minigpt.generate import (
    apply_repetition_penalty,
    apply_temperature,
    beam_search,
    complete,
    filter_logits,
    generate,
    generate_text,
    left_pad,
    min_p_filter,
    next_token_probs,
    stream,
    top_k_filter,
    top_p_filter,
)
from minigpt.model import GPT, GPTConfig

INF = float("-inf")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=48, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # sharpen the random model so greedy paths are far from ties
        m.transformer.wte.weight.mul_(20)
    return m.eval()


def prompt(batch: int = 1, length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(50, (batch, length), generator=torch.Generator().manual_seed(seed))


def probs_of(logits: torch.Tensor) -> list[float]:
    return logits.softmax(-1).tolist()


@pytest.mark.parametrize("batch", [1, 3])
def test_cached_equals_uncached_greedy(model: GPT, batch: int) -> None:
    idx = prompt(batch)
    cached = generate(model, idx, 30, temperature=0)
    uncached = generate(model, idx, 30, temperature=0, use_cache=False)
    assert cached.shape == (batch, 35)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], idx)


@pytest.mark.parametrize("batch", [1, 4])
def test_cached_equals_uncached_sampling(model: GPT, batch: int) -> None:
    idx = prompt(batch, seed=1)
    kw = dict(temperature=0.9, top_k=20, top_p=0.95, min_p=0.01, repetition_penalty=1.2)
    cached = generate(model, idx, 30, generator=torch.Generator().manual_seed(7), **kw)
    uncached = generate(model, idx, 30, use_cache=False, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(cached, uncached)
    again = generate(model, idx, 30, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(cached, again)


def test_uncached_slides_past_block_size(model: GPT) -> None:
    out = generate(model, prompt(length=40), 20, temperature=0, use_cache=False)
    assert out.shape == (1, 60)


def test_greedy_is_argmax_of_full_forward(model: GPT) -> None:
    idx = prompt(2)
    out = generate(model, idx, 1, temperature=0)
    with torch.no_grad():
        expected = model(idx)[0][:, -1].argmax(-1)
    assert torch.equal(out[:, -1], expected)


def test_temperature() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert apply_temperature(logits, 0.5).tolist() == [[4.0, 2.0, 0.0]]
    with pytest.raises(ValueError, match="greedy"):
        apply_temperature(logits, 0)
    greedy = next_token_probs(logits, temperature=0)
    assert greedy.tolist() == [[1.0, 0.0, 0.0]]


def test_top_k() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, 0.0, 1.0, -1.0]])
    assert top_k_filter(logits, 2).tolist() == [[INF, 4.0, 3.0, INF], [0.0, 0.0, 1.0, INF]]  # ties kept
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.25, 0.15]]))
    # Sorted: 0.5, 0.25 (0.75), 0.15 (0.90), 0.1 (1.0).
    assert top_p_filter(logits, 0.5)[0].isfinite().tolist() == [False, True, False, False]
    assert top_p_filter(logits, 0.6)[0].isfinite().tolist() == [False, True, True, False]
    assert top_p_filter(logits, 0.9)[0].isfinite().tolist() == [False, True, True, True]
    assert top_p_filter(logits, 0.91)[0].isfinite().tolist() == [True, True, True, True]
    assert top_p_filter(logits, 0.01)[0].isfinite().tolist() == [False, True, False, False]
    kept = next_token_probs(logits, top_p=0.6)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.5 / 0.75, 0.25 / 0.75, 0.0]]))


def test_min_p_keeps_tokens_above_fraction_of_max() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # Threshold 0.3 * 0.5 = 0.15: 0.15 stays (>=), 0.05 goes.
    assert min_p_filter(logits, 0.3)[0].isfinite().tolist() == [True, True, True, False]
    assert min_p_filter(logits, 0.61)[0].isfinite().tolist() == [True, False, False, False]
    assert torch.equal(min_p_filter(logits, 0.0), logits)


def test_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[0, 1, 1]])  # token 1 twice: penalised once
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0]]  # pure: input untouched


def test_filter_order_matches_transformers() -> None:
    """Our chain equals transformers' processors applied in the order its generate() builds them."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits, idx = torch.randn(4, 30) * 3, torch.randint(30, (4, 6))
    expected = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(12),
                 TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        expected = proc(idx, expected)
    ours = filter_logits(logits, idx, repetition_penalty=1.3, temperature=0.7, top_k=12, top_p=0.8, min_p=0.05)
    assert torch.equal(ours.isfinite(), expected.isfinite())
    torch.testing.assert_close(ours.softmax(-1), expected.softmax(-1))


def test_next_token_probs_is_a_distribution() -> None:
    torch.manual_seed(0)
    probs = next_token_probs(torch.randn(3, 40), temperature=0.8, top_k=10, top_p=0.9, min_p=0.05)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    assert ((probs > 0).sum(-1) <= 10).all()


def test_stop_tokens_stop_rows_and_pad(model: GPT) -> None:
    idx = prompt(3, seed=3)
    free = generate(model, idx, 20, temperature=0)
    stop = int(free[0, 8])  # the 4th token row 0 generates
    out = generate(model, idx, 20, temperature=0, stop_tokens=[stop], pad_token=-1)
    for row_free, row in zip(free, out):
        gen_free, gen = row_free[5:].tolist(), row[5:].tolist()
        if stop in gen_free[: len(gen)]:
            cut = gen_free.index(stop) + 1
            assert gen[:cut] == gen_free[:cut] and set(gen[cut:]) <= {-1}
        else:
            assert gen == gen_free[: len(gen)]
    if all(stop in r[5:].tolist() for r in free):  # every row stopped: generation ended early
        assert out.size(1) < free.size(1)


def test_stream_equals_generate(model: GPT) -> None:
    idx = prompt(2, seed=4)
    kw = dict(temperature=1.0, top_k=10)
    steps = list(stream(model, idx, 12, generator=torch.Generator().manual_seed(3), **kw))
    assert len(steps) == 12 and all(s.shape == (2,) for s in steps)
    out = generate(model, idx, 12, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(torch.stack(steps, 1), out[:, 5:])


def test_errors(model: GPT) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="prompt has 49 tokens.*block_size=48"):
        generate(model, prompt(length=49), 1)
    with pytest.raises(ValueError, match=r"prompt \(40\) \+ max_new_tokens \(20\) = 60 exceeds.*use_cache=False"):
        generate(model, prompt(length=40), 20)
    for bad in (dict(top_k=0), dict(top_p=0.0), dict(min_p=1.5), dict(repetition_penalty=0.0)):
        with pytest.raises(ValueError):
            generate(model, prompt(), 1, **bad)


def test_restores_training_mode(model: GPT) -> None:
    model.train()
    try:
        generate(model, prompt(), 2)
        assert model.training
    finally:
        model.eval()


def test_generate_text(model: GPT) -> None:
    class Digits:  # a stand-in tokenizer: token i <-> chr(65 + i)
        def encode(self, text: str) -> list[int]:
            return [ord(c) - 65 for c in text]

        def decode(self, ids: list[int]) -> str:
            return "".join(chr(65 + i) for i in ids)

    text = generate_text(model, Digits(), "HELLO", 10, temperature=0)
    ids = generate(model, torch.tensor([Digits().encode("HELLO")]), 10, temperature=0)[0, 5:].tolist()
    assert text == Digits().decode(ids)
    stop = ids[3]
    short = generate_text(model, Digits(), "HELLO", 10, temperature=0, stop_tokens=[stop])
    assert short == Digits().decode(ids[: ids.index(stop)])
    once = generate_text(model, Digits(), "HELLO", 10, temperature=0, stop_tokens=iter([stop]))  # a one-shot iterable
    assert once == short


# -- beam search ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_pair() -> tuple[object, GPT]:
    """A random GPT-2 in transformers and the same weights in ours, sharpened so that the beams'
    scores are far from ties."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=40, n_layer=2, n_head=2, n_embd=32,
                                     bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():
        hf.transformer.wte.weight.mul_(8)
    ours = GPT.from_hf_state_dict(hf.state_dict(), GPTConfig.from_hf_config(hf.config)).eval()
    return hf, ours


@pytest.mark.parametrize("num_beams", [1, 2, 3, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_returns_the_tokens_of_transformers(hf_pair, num_beams: int, length_penalty: float) -> None:
    """Token for token what transformers' generate(num_beams=...) returns on the same weights,
    with and without a stop token (one the model emits early, so beams finish at different steps)."""
    hf, ours = hf_pair
    for seed in range(3):
        idx = torch.randint(60, (1, 6), generator=torch.Generator().manual_seed(seed))
        greedy = generate(ours, idx, 12, temperature=0)[0, 6:].tolist()
        for stop in (None, greedy[2]):
            kwargs = dict(eos_token_id=stop, pad_token_id=stop) if stop is not None else dict(pad_token_id=0)
            with torch.no_grad():
                expected = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12,
                                       num_beams=num_beams, do_sample=False, length_penalty=length_penalty,
                                       early_stopping=False, **kwargs)
            for use_cache in (True, False):
                got, score = beam_search(ours, idx, 12, num_beams=num_beams, length_penalty=length_penalty,
                                         stop_tokens=[stop] if stop is not None else None, use_cache=use_cache)
                assert got.tolist() == expected.tolist(), (seed, stop, use_cache)
                # The score is the sum of the chosen tokens' log-probabilities / length ** penalty.
                with torch.no_grad():
                    logprobs = ours(got.clone())[0].log_softmax(-1)[0, 5:-1].gather(-1, got[0, 6:, None]).sum()
                n = got.size(1) - 6
                assert score == pytest.approx(float(logprobs) / n ** length_penalty, abs=1e-4)


def test_beam_search_finds_likelier_sequences_than_greedy() -> None:
    """Greedy commits to the best next token; a wider beam may give it up for a better whole (on
    a model not sharpened, where the best next token is often not the start of the best whole).
    Not on every prompt: the beam can prune the greedy path and end below it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()
    gains = []
    for seed in range(8):
        idx = prompt(seed=seed)
        gains.append(beam_search(model, idx, 10, num_beams=4, length_penalty=0.0)[1]
                     - beam_search(model, idx, 10, num_beams=1, length_penalty=0.0)[1])
    assert sum(g > 1e-5 for g in gains) >= 4 and sum(gains) > 0, gains


def test_beam_search_returns_a_tensor_a_caller_may_train_on(model: GPT) -> None:
    """Searched under inference mode, returned as an ordinary tensor (as generate's are)."""
    seq, _ = beam_search(model, prompt(), 4, num_beams=2)
    assert not seq.is_inference()
    model.train()
    try:
        model(seq[:, :-1], seq[:, 1:])[1].backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_the_filters_see_float32_logits_from_a_bf16_model(monkeypatch) -> None:
    """Top-p's cumulative sum in bf16 moves in steps of about 0.002 near 0.9 and cuts too early."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)).to(torch.bfloat16).eval()
    seen = []
    real = minigpt.generate.sample_next
    monkeypatch.setattr(minigpt.generate, "sample_next", lambda logits, **kw: seen.append(logits.dtype) or real(logits, **kw))
    generate(m, prompt(), 3, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert seen == [torch.float32] * 3


def test_beam_search_refuses_what_it_cannot_do(model: GPT) -> None:
    with pytest.raises(ValueError, match="one prompt of shape"):
        beam_search(model, prompt(batch=2), 5)
    with pytest.raises(ValueError, match="exceeds block_size=48; lower max_new_tokens to 43"):
        beam_search(model, prompt(), 44)
    with pytest.raises(ValueError, match="num_beams=0"):
        beam_search(model, prompt(), 5, num_beams=0)


# -- prompts of different lengths in one batch ---------------------------------------------------

@pytest.mark.parametrize("switches", [{}, dict(position="rope", n_kv_head=1), dict(attn_impl="naive")])
def test_a_left_padded_row_continues_as_it_would_alone(switches: dict) -> None:
    """Positions count from each row's first real token and no token attends to padding, so a
    padded row's logits are its logits alone, cached or not, and greedy decoding picks the same
    tokens (with a repetition penalty, which must not count the pad id as seen)."""
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=50, block_size=48, n_layer=2, n_head=2, n_embd=32, **switches)).eval()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(20)
    prompts = [prompt(length=n, seed=n)[0].tolist() for n in (3, 9, 1, 6)]
    idx, mask = left_pad(prompts, pad_token=prompts[0][0])  # a pad id the rows also use
    assert idx.shape == (4, 9) and mask.sum(1).tolist() == [3, 9, 1, 6]
    with torch.no_grad():
        logits, _ = m(idx, attention_mask=mask)
        for row, p in enumerate(prompts):
            alone, _ = m(torch.tensor([p]))
            torch.testing.assert_close(logits[row, -len(p):], alone[0], atol=1e-5, rtol=1e-5)
    for use_cache in (True, False):
        for penalty in (1.0, 1.5):
            batch = generate(m, idx, 12, temperature=0, attention_mask=mask, use_cache=use_cache,
                             repetition_penalty=penalty)[:, 9:]
            for row, p in enumerate(prompts):
                alone = generate(m, torch.tensor([p]), 12, temperature=0, repetition_penalty=penalty)[0, len(p):]
                assert batch[row].tolist() == alone.tolist(), (row, use_cache, penalty)


def test_left_padded_greedy_decoding_returns_the_tokens_of_transformers(hf_pair) -> None:
    """transformers' generate with the same left padding and attention mask, on the same weights."""
    hf, ours = hf_pair
    prompts = [torch.randint(60, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (2, 7, 4)]
    idx, mask = left_pad(prompts)
    with torch.no_grad():
        expected = hf.generate(idx, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                               output_logits=True, return_dict_in_generate=True)
        got = generate(ours, idx, 10, temperature=0, attention_mask=mask)
        assert got.tolist() == expected.sequences.tolist()
        # And the logits behind every step: one forward over the padded prompts and their answers.
        logits, _ = ours(got, attention_mask=torch.cat([mask, torch.ones(3, 10, dtype=mask.dtype)], 1))
    torch.testing.assert_close(logits[:, 6:-1], torch.stack(expected.logits, 1), atol=1e-4, rtol=1e-4)


def test_given_positions_are_transformers_position_ids(hf_pair, model: GPT) -> None:
    """forward(positions=) places each token where it is told, as transformers' position_ids do."""
    hf, ours = hf_pair
    idx = torch.randint(60, (2, 6), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[0, 1, 1, 5, 9, 9], [3, 2, 1, 0, 7, 8]])  # shared, reversed, skipped
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, positions=positions)[0], hf(idx, position_ids=positions).logits,
                                   atol=1e-4, rtol=1e-4)
        rope = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, position="rope"))
        x = idx % 50
        torch.testing.assert_close(rope(x, positions=torch.arange(6).expand(2, 6))[0], rope(x)[0])
        assert not torch.allclose(rope(x, positions=torch.arange(6).expand(2, 6) * 3)[0], rope(x)[0])
    with pytest.raises(ValueError, match="shape of idx"):
        ours(idx, positions=positions[:, 1:])
    with pytest.raises(ValueError, match="learned positions have rows 0..47"):
        model(idx % 50, positions=positions + 40)
    with pytest.raises(ValueError, match="prefix"):
        model(idx % 50, positions=positions, prefix=torch.zeros(2, 1, 32))


def test_complete_batches_prompts_of_any_length(model: GPT) -> None:
    prompts = [prompt(length=n, seed=n)[0].tolist() for n in (5, 2, 8, 2, 5, 1)]
    stop = 7
    alone = [complete(model, [p], 10, stop_tokens=[stop])[0] for p in prompts]
    assert complete(model, prompts, 10, stop_tokens=[stop], batch_size=4) == alone
    assert complete(model, prompts, 10, stop_tokens=[stop], batch_size=64) == alone


def test_padding_is_refused_where_it_cannot_work(model: GPT) -> None:
    idx, mask = left_pad([[1, 2, 3], [4]])
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(model, idx, 3, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="shape of idx"):
        generate(model, idx, 3, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []])
    with pytest.raises(ValueError, match="prefix"):
        model(idx, attention_mask=mask, prefix=torch.zeros(2, 1, 32))
