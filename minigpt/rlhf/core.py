"""What every RLHF method shares: sampling responses, packing them, and per-token log-probs.

A *response* is the token ids the policy wrote after a chat prompt (:func:`~minigpt.chat.render_prompt`),
ending with ``<|end|>`` when the model finished its turn. Prompt + response rows are packed into
one batch and scored token by token by :mod:`minigpt.logprobs` (:func:`pack`,
:func:`token_logprobs`, re-exported here); every loss of this package averages or sums over the
response mask, so prompt and padding never count.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from minigpt.chat import END_OF_TURN, Conversation, check_chat_tokenizer, render_prompt
from minigpt.generate import complete
from minigpt.logprobs import Packed, pack, token_logprobs
from minigpt.model import GPT, evaluating
from minigpt.tokenizer import BPETokenizer
from minigpt.train import TrainConfig, TrainingDiverged, lr_at, make_optimizer

__all__ = [
    "Packed",
    "Stepper",
    "end_token",
    "finished",
    "masked_mean",
    "pack",
    "prompt_ids",
    "response_text",
    "sample_responses",
    "sequence_kl",
    "token_logprobs",
    "whiten",
]


def end_token(tokenizer: BPETokenizer) -> int:
    """The id of ``<|end|>``, the token that ends an assistant turn (and a response)."""
    return check_chat_tokenizer(tokenizer)[END_OF_TURN]


def response_text(tokenizer: BPETokenizer, response: Sequence[int]) -> str:
    """A response's text, without its final ``<|end|>``."""
    end = end_token(tokenizer)
    return tokenizer.decode(list(response[:-1] if response and response[-1] == end else response))


def finished(tokenizer: BPETokenizer, responses: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B,) True where the response ended its turn with ``<|end|>`` (not cut off by the length limit)."""
    end = end_token(tokenizer)
    return torch.tensor([bool(r) and r[-1] == end for r in responses])


def prompt_ids(conversations: Iterable[Conversation], tokenizer: BPETokenizer) -> list[list[int]]:
    """The chat prompt of each conversation, ready for the policy to answer."""
    return [render_prompt(c, tokenizer) for c in conversations]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the True entries of ``mask``."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` shifted to zero mean and scaled to unit variance over ``mask``; zero outside it."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def sample_responses(model: GPT, prompts: Sequence[Sequence[int]], tokenizer: BPETokenizer, *,
                     max_new_tokens: int, temperature: float = 1.0, generator: torch.Generator | None = None,
                     batch_size: int = 256) -> list[list[int]]:
    """One sampled response per prompt, ending at ``<|end|>`` if the model wrote it."""
    return complete(model, prompts, max_new_tokens, stop_tokens=[end_token(tokenizer)], batch_size=batch_size,
                    temperature=temperature, generator=generator)


@torch.no_grad()
def sequence_kl(policy: GPT, reference: GPT, prompts: Sequence[Sequence[int]], tokenizer: BPETokenizer, *,
                max_new_tokens: int, seed: int = 0) -> float:
    """KL(policy || reference) in nats per response, estimated on responses the policy samples at
    temperature 1: the mean over responses of the summed log-ratio of their tokens."""
    gen = torch.Generator(device=policy.transformer.wte.weight.device).manual_seed(seed)
    responses = sample_responses(policy, prompts, tokenizer, max_new_tokens=max_new_tokens, generator=gen)
    batch = pack(prompts, responses, device=policy.transformer.wte.weight.device)
    with evaluating(policy, reference):
        log_ratio = (token_logprobs(policy, batch.ids, mask=batch.mask)
                     - token_logprobs(reference, batch.ids, mask=batch.mask))
    return float(log_ratio.sum(-1).mean())


class Stepper:
    """An optimizer step as the pretraining Trainer takes it (AdamW with decay on matrices only,
    warmup then cosine, gradient clipping), for the RLHF loops, which make their own batches."""

    def __init__(self, params_of: torch.nn.Module, *, learning_rate: float, max_steps: int,
                 warmup_steps: int = 0, weight_decay: float = 0.0, grad_clip: float = 1.0) -> None:
        self.cfg = TrainConfig(max_steps=max_steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
                               weight_decay=weight_decay, grad_clip=grad_clip, min_lr_ratio=1.0)
        self.module = params_of
        device = next(params_of.parameters()).device.type
        self.optimizer = make_optimizer(params_of, self.cfg, device)
        self.step_count = 0

    def step(self, loss: torch.Tensor) -> float:
        """Backward ``loss``, clip, update; returns the gradient norm before clipping. A non-finite
        norm (a NaN or infinite loss gives one too) stops the run before the update spoils the model."""
        lr = lr_at(self.step_count, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss.backward()
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf))
        if not math.isfinite(norm):
            raise TrainingDiverged(f"training diverged at update {self.step_count + 1}: gradient norm {norm}, loss "
                                   f"{float(loss.detach()):.4g}; likely causes: a learning rate too high ({lr:.3g}) or "
                                   f"gradient clipping off (grad_clip={self.cfg.grad_clip}). Lower the stage's "
                                   "learning rate (--rlhf.STAGE.learning_rate) and run it again")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return norm


def draw(items: Sequence[Any], n: int, rng: random.Random) -> list[Any]:
    """``n`` items drawn without replacement (with replacement once ``n`` exceeds the pool)."""
    return rng.sample(list(items), n) if n <= len(items) else rng.choices(list(items), k=n)


RewardFn = Callable[[Conversation, str], float]
