"""Images as tokens: patches, the prefix path of GPT.forward, and captioning digits at `ci`."""

from __future__ import annotations

import sys

import pytest
import torch

from minigpt.model import GPT, GPTConfig
from minigpt.pretrain import EOT
from minigpt.recipe import Recipe
from minigpt.runs import trained
from minigpt.train import TrainConfig, Trainer
from minigpt.vision import (
    Captioner,
    CaptionSource,
    caption_batch,
    caption_text,
    fit_captioner,
    load_digits,
    majority_baseline,
    patchify,
    split,
    unpatchify,
)

SMALL = dict(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=64)


def small_gpt(**overrides: object) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **overrides})).eval()  # type: ignore[arg-type]


def test_patches_reassemble_the_image() -> None:
    images = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 8, 8)
    patches = patchify(images, 2)
    assert patches.shape == (2, 16, 4)
    # Patch 5 is row 1, column 1 of the 4 x 4 grid: pixels (2..3, 2..3), row-major.
    torch.testing.assert_close(patches[1, 5], images[1, 2:4, 2:4].reshape(4))
    for p in (1, 2, 4, 8):
        torch.testing.assert_close(unpatchify(patchify(images, p), p, 8, 8), images, atol=0, rtol=0)
    with pytest.raises(ValueError, match="patch=3 must divide the image size 8x8"):
        patchify(images, 3)


@pytest.mark.parametrize("switches", [{}, dict(position="rope", norm="rmsnorm", n_kv_head=2)])
def test_empty_prefix_changes_nothing_and_a_prefix_is_an_embedding(switches: dict) -> None:
    model = small_gpt(**switches)
    idx = torch.randint(100, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(idx)
        empty, _ = model(idx, prefix=torch.zeros(3, 0, 64))
        torch.testing.assert_close(empty, full, atol=0, rtol=0)
        # A prefix of the first 4 tokens' embeddings reads like those tokens: same later logits.
        prefix = model.transformer.wte(idx[:, :4])
        torch.testing.assert_close(model(idx[:, 4:], prefix=prefix)[0], full[:, 4:], atol=1e-5, rtol=1e-5)
        cache = model.new_kv_cache(3)
        first, _ = model(idx[:, 4:6], prefix=prefix, kv_cache=cache)
        second, _ = model(idx[:, 6:], kv_cache=cache)
        torch.testing.assert_close(torch.cat([first, second], 1), full[:, 4:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"prefix must be \(batch=3, length, n_embd=64\)"):
        model(idx, prefix=torch.zeros(3, 2, 32))
    with pytest.raises(ValueError, match="a prefix of 30 included"):
        model(idx, prefix=torch.zeros(3, 30, 64))


def test_caption_batch_and_greedy_caption_shapes() -> None:
    inputs, targets = caption_batch(torch.tensor([1, 0]), [[5, 6, 7], [8]], eot=9)
    assert inputs.tolist() == [[9, 8, 9, 9], [9, 5, 6, 7]]
    assert targets.tolist() == [[8, 9, -100, -100], [5, 6, 7, 9]]
    model = Captioner(small_gpt())
    out = model.caption(torch.rand(3, 8, 8), start=1, stop=2, max_tokens=5)
    assert len(out) == 3 and all(len(row) <= 5 and 2 not in row for row in out)
    with pytest.raises(ValueError, match=r"images must be \(batch, 8, 8\)"):
        model.embed(torch.rand(3, 4, 4))


def test_caption_source_draws_seeded_rows_and_resumes_on_the_same_batches() -> None:
    images = torch.arange(6.0)[:, None, None].expand(6, 8, 8)  # image i is all i: its pixels name its row
    labels, captions = torch.tensor([0, 1, 2, 0, 1, 2]), [[5], [6, 7], [8]]

    def source(seed: int = 3) -> CaptionSource:
        return CaptionSource(images, labels, captions, eot=9, batch_size=4, seed=seed)

    def flat(batch: tuple) -> list[torch.Tensor]:
        (x, idx), y = batch
        return [x, idx, y]

    first = source()
    batches = [flat(first.next_batch()) for _ in range(3)]
    x, idx, y = batches[0]
    rows = x[:, 0, 0].long()
    assert x.shape == (4, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip((idx, y), caption_batch(labels[rows], captions, 9)))
    assert not all(torch.equal(a, b) for a, b in zip(batches[0], flat(source(seed=4).next_batch())))
    state = first.state_dict()
    assert state == {"seed": 3, "drawn": 3}
    resumed = source(seed=0)
    resumed.load_state_dict(state)  # a resumed run: the seed and position come from the checkpoint
    assert all(torch.equal(a, b) for a, b in zip(flat(resumed.next_batch()), flat(first.next_batch())))
    first.reset()
    assert all(torch.equal(a, b) for a, b in zip(flat(first.next_batch()), batches[0]))
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        CaptionSource(images, labels, captions, eot=9, batch_size=0)
    with pytest.raises(ValueError, match="as many images as labels"):
        CaptionSource(images, labels[:5], captions, eot=9, batch_size=4)


def test_the_trainer_trains_on_a_tuple_of_inputs() -> None:
    """A captioner reads (images, token ids): the Trainer calls model(*inputs, targets)."""
    images, labels = torch.rand(20, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 10
    data = CaptionSource(images, labels, [[d + 10, d + 20] for d in range(10)], eot=1, batch_size=10)
    model = Captioner(small_gpt())
    (x, idx), y = data.next_batch()
    data.reset()
    with torch.no_grad():
        first = model(x, idx, y)[1].item()
    cfg = TrainConfig(max_steps=30, warmup_steps=3, learning_rate=1e-2, eval_interval=0, log_interval=1)
    history = Trainer(model, cfg, data).fit(progress=False)  # type: ignore[arg-type]
    assert [r["step"] for r in history] == list(range(1, 31))
    assert history[0]["loss"] == pytest.approx(first, rel=1e-6)
    assert history[-1]["loss"] < history[0]["loss"] / 2


def test_captions_are_english() -> None:
    assert [caption_text(d) for d in (0, 1, 7, 8)] == ["a zero", "a one", "a seven", "an eight"]


def test_split_is_fixed_by_seed_and_disjoint() -> None:
    train, test = split(100, 0.2, seed=3)
    assert len(test) == 20 and set(train.tolist()).isdisjoint(test.tolist())
    assert torch.equal(split(100, 0.2, seed=3)[1], test) and not torch.equal(split(100, 0.2, seed=4)[1], test)


def test_missing_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'minigpt\[vision\]'"):
        load_digits()


@pytest.mark.slow
@pytest.mark.outcome
def test_captions_digits_well_above_the_majority_baseline_at_ci(ci: Recipe, outcome) -> None:
    """Chapter 11's from-scratch run at `ci` (about 10 s): the majority baseline is 8.6% of the
    359 test images."""
    pytest.importorskip("sklearn", reason="pip install 'minigpt[vision]'")
    _, tok = trained(ci, "pretrain")
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and 0 <= images.min() and images.max() <= 1
    train, test = split(len(labels))
    _, baseline = majority_baseline(labels[train], labels[test])
    assert baseline < 0.12
    torch.manual_seed(ci.seed)
    gpt = GPT(GPTConfig.from_recipe(ci, vocab_size=tok.vocab_size))
    v = ci.vision
    run = fit_captioner(gpt, tok, tok.special_tokens[EOT], (images, labels), train, test, patch=v.patch, seed=ci.seed,
                        steps=v.steps, batch_size=v.batch_size, learning_rate=v.learning_rate)
    outcome.check("vision: last loss / first loss", run.losses[-1] / run.losses[0], "<", 0.1)  # spread 0.021 .. 0.034 (6 runs)
    outcome.check("vision: caption accuracy", run.accuracy, ">", 0.4)  # spread 0.641 .. 0.774 (6 runs)
