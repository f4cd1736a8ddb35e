"""Images become tokens (chapter 11): the same GPT reads an image as a prefix and captions it.

An image is cut into square patches; a linear map (the *patch embedding*) turns each patch's
pixels into a vector of the model's width, and a learned vector per patch position says where
it was. Those vectors go in front of the token embeddings through ``GPT.forward(prefix=...)``,
and the model is trained to continue them with a caption ("a seven", then the end-of-text
token), exactly as it continues text. This is the recipe of ViT's patch embedding and of
prefix-style vision-language models, at the size of scikit-learn's 8x8 digits (1,797 images,
shipped with scikit-learn, so no download).

scikit-learn is an optional extra: ``pip install 'minigpt[vision]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn

from minigpt.model import GPT, evaluating
from minigpt.train import TrainConfig, Trainer

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits: images (1797, 8, 8) scaled to [0, 1] and labels (1797,)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ImportError("the digit images come with scikit-learn: pip install 'minigpt[vision]' "
                          "(or pip install scikit-learn)") from err
    digits = sklearn_digits()
    return torch.tensor(digits.images / 16.0, dtype=torch.float32), torch.tensor(digits.target, dtype=torch.long)


def split(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test indices of ``n`` examples: a random permutation fixed by ``seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be between 0 and 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    return order[n_test:], order[:n_test]


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, H, W) images -> (B, H/patch * W/patch, patch * patch) patches, row by row, each flattened
    row-major: patch ``r * (W / patch) + c`` is ``images[:, r*patch:(r+1)*patch, c*patch:(c+1)*patch]``."""
    if images.dim() != 3:
        raise ValueError(f"images must be (batch, height, width), got shape {tuple(images.shape)}")
    B, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"patch={patch} must divide the image size {H}x{W}")
    x = images.reshape(B, H // patch, patch, W // patch, patch).transpose(2, 3)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch)


def unpatchify(patches: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, N, patch * patch) -> (B, height, width)."""
    B = patches.size(0)
    x = patches.reshape(B, height // patch, width // patch, patch, patch).transpose(2, 3)
    return x.reshape(B, height, width)


class Captioner(nn.Module):
    """A GPT with a patch embedding in front: ``forward(images, idx, targets)`` returns the GPT's
    ``(logits, loss)`` for the caption tokens ``idx`` read after the image's patches."""

    def __init__(self, gpt: GPT, image_size: int = 8, patch: int = 2) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch={patch} must divide image_size={image_size}")
        self.gpt, self.image_size, self.patch = gpt, image_size, patch
        n_patches = (image_size // patch) ** 2
        device = gpt.transformer.wte.weight.device  # the new weights live where the GPT does
        self.patch_embed = nn.Linear(patch * patch, gpt.config.n_embd, device=device)
        # Where each patch sits in the image: learned, as GPT-2 learns its token positions.
        self.patch_pos = nn.Parameter(torch.randn(n_patches, gpt.config.n_embd, device=device) * 0.02)

    @property
    def n_patches(self) -> int:
        return self.patch_pos.size(0)

    @property
    def device(self) -> torch.device:
        return self.patch_pos.device

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) images (on any device) -> (B, n_patches, n_embd): the prefix the GPT reads."""
        if images.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be (batch, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        return self.patch_embed(patchify(images.to(self.device), self.patch)) + self.patch_pos

    def flops_per_token(self) -> int:
        """Training FLOPs per position the GPT reads, for the Trainer's MFU on a GPU: the GPT's (at
        block_size) plus the patch embedding's 6 * its weights (run at patch positions only: an upper
        bound). The Trainer counts caption tokens, not patches, so its MFU leaves the patches out."""
        return self.gpt.flops_per_token() + 6 * self.patch_embed.weight.numel()

    def forward(self, images: torch.Tensor, idx: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        targets = None if targets is None else targets.to(self.device)
        return self.gpt(idx.to(self.device), targets, prefix=self.embed(images))

    @torch.no_grad()
    def caption(self, images: torch.Tensor, start: int, stop: int, max_tokens: int) -> list[list[int]]:
        """Greedy captions: read each image and ``start``, then up to ``max_tokens`` tokens, with
        a KV cache; each caption is cut before its first ``stop`` token (no stop: all kept)."""
        with evaluating(self):
            B = images.size(0)
            cache = self.gpt.new_kv_cache(B, self.n_patches + 1 + max_tokens)
            idx = torch.full((B, 1), start, dtype=torch.long, device=self.device)
            logits, _ = self.gpt(idx, prefix=self.embed(images), kv_cache=cache, last_only=True)
            steps = []
            for i in range(max_tokens):
                token = logits[:, -1].argmax(dim=-1)
                steps.append(token)
                if i < max_tokens - 1:
                    logits, _ = self.gpt(token[:, None], kv_cache=cache, last_only=True)
            rows = torch.stack(steps, dim=1).tolist()
        return [row[:row.index(stop)] if stop in row else row for row in rows]


def caption_text(label: int) -> str:
    """A digit's caption: "a zero" ... "a nine", but "an eight"."""
    name = DIGIT_NAMES[label]
    return f"{'an' if name == 'eight' else 'a'} {name}"


def caption_ids(tokenizer: Tokenizer) -> list[list[int]]:
    """The token ids of each digit's caption (:func:`caption_text`)."""
    return [tokenizer.encode(caption_text(d)) for d in range(len(DIGIT_NAMES))]


def caption_batch(labels: torch.Tensor, captions: Sequence[Sequence[int]], eot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[eot] + caption`` and targets ``caption + [eot]`` for each label, right-padded
    (inputs with ``eot``, targets with -100, which the loss skips) to the longest caption."""
    width = max(len(captions[int(y)]) for y in labels) + 1
    idx = torch.full((len(labels), width), eot, dtype=torch.long)
    targets = torch.full((len(labels), width), -100, dtype=torch.long)
    for row, y in enumerate(labels.tolist()):
        ids = list(captions[y])
        idx[row, 1:len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
        targets[row, :len(ids) + 1] = torch.tensor(ids + [eot], dtype=torch.long)
    return idx, targets


class CaptionSource:
    """A :class:`~minigpt.train.BatchSource` of captioned images: each batch is ``batch_size`` rows
    drawn at random (with replacement), inputs ``(images, caption ids)`` and targets as in
    :func:`caption_batch`. Batch ``n`` is drawn from ``(seed, n)`` alone, so the position is two
    integers and a resumed run goes on with the batches of a run that never stopped."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, captions: Sequence[Sequence[int]], eot: int,
                 batch_size: int, *, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if len(images) != len(labels) or not len(labels):
            raise ValueError(f"need as many images as labels, at least one: got {len(images)} and {len(labels)}")
        self.images, self.labels, self.captions, self.eot = images, labels, captions, eot
        self.batch_size, self.seed = batch_size, seed
        self.reset()

    def next_batch(self) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        draw = np.random.default_rng([self.seed, self.drawn]).integers(len(self.labels), size=self.batch_size)
        self.drawn += 1
        rows = torch.from_numpy(draw)
        idx, targets = caption_batch(self.labels[rows], self.captions, self.eot)
        return (self.images[rows], idx), targets

    def reset(self) -> None:
        """Back to the first batch."""
        self.drawn = 0

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.drawn = state["seed"], state["drawn"]


@dataclass
class CaptionRun:
    """A trained captioner and how it did."""

    model: Captioner
    losses: list[float]  # training loss per step
    accuracy: float  # exact-match caption accuracy on the test images
    predictions: list[str]  # the test images' captions, decoded


def train_captioner(model: Captioner, images: torch.Tensor, labels: torch.Tensor, tokenizer: Tokenizer, eot: int,
                    *, steps: int, batch_size: int = 64, learning_rate: float = 1e-3, seed: int = 0) -> list[float]:
    """Train every weight of ``model`` (patch embedding and GPT) to caption ``images`` with the
    book's one :class:`~minigpt.train.Trainer` (AdamW, warmup and cosine decay as in pretraining),
    on random batches drawn with ``seed`` (:class:`CaptionSource`). Returns the loss of every step."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    source = CaptionSource(images, labels, caption_ids(tokenizer), eot, batch_size, seed=seed)
    cfg = TrainConfig(max_steps=steps, warmup_steps=max(1, steps // 10), learning_rate=learning_rate,
                      eval_interval=0, log_interval=1)
    trainer = Trainer(model, cfg, source, device=str(model.device))  # type: ignore[arg-type]  # a GPT in all but name
    return [record["loss"] for record in trainer.fit(progress=False)]


def evaluate_captions(model: Captioner, images: torch.Tensor, labels: torch.Tensor, tokenizer: Tokenizer,
                      eot: int) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy captions (the right words, then the end token) and the
    decoded captions."""
    captions = caption_ids(tokenizer)
    max_tokens = max(len(c) for c in captions) + 1  # room for the end token
    predicted = model.caption(images, start=eot, stop=eot, max_tokens=max_tokens)
    hits = 0
    for ids, y in zip(predicted, labels.tolist()):
        # caption() keeps a row without any end token whole: it must not count as a match.
        ended = len(ids) < max_tokens
        hits += ended and ids == captions[y]
    return hits / len(labels), [tokenizer.decode(ids) for ids in predicted]


def majority_baseline(train_labels: torch.Tensor, test_labels: torch.Tensor) -> tuple[int, float]:
    """The most frequent training label and the test accuracy of always answering it."""
    majority = int(torch.bincount(train_labels).argmax())
    return majority, (test_labels == majority).float().mean().item()


def fit_captioner(gpt: GPT, tokenizer: Tokenizer, eot: int, data: tuple[torch.Tensor, torch.Tensor],
                  train_idx: torch.Tensor, test_idx: torch.Tensor, *, patch: int = 2, seed: int = 0,
                  **train_args: Any) -> CaptionRun:
    """Wrap ``gpt`` in a :class:`Captioner`, train it on ``train_idx`` of ``data`` (images, labels)
    and measure it on ``test_idx``; ``train_args`` go to :func:`train_captioner`."""
    images, labels = data
    torch.manual_seed(seed)  # the patch embedding's initial weights
    model = Captioner(gpt, image_size=images.size(-1), patch=patch)
    losses = train_captioner(model, images[train_idx], labels[train_idx], tokenizer, eot, seed=seed, **train_args)
    accuracy, predictions = evaluate_captions(model, images[test_idx], labels[test_idx], tokenizer, eot)
    return CaptionRun(model, losses, accuracy, predictions)
