"""Sampling text from a GPT: logit filters, batched generation with a KV cache, streaming.

Each filter is a small pure function ``logits -> logits`` (removed tokens get ``-inf``), and
:func:`next_token_probs` chains them into the final distribution, which is what a sampling
widget wants to plot. The order is Hugging Face ``transformers``' (``_get_logits_processor``):
repetition penalty, temperature, top-k, top-p, min-p. Order matters: temperature before top-p
changes which tokens make up the top-p mass, and min-p compares against the top probability
after the earlier filters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from minigpt.errors import NaNLogitsError
from minigpt.model import GPT, evaluating

#: What a NaN model is told: where NaN logits come from, and what to do.
_NAN_LOGITS = ("the model's next-token logits are NaN, so no token can be chosen: its weights are broken "
               "(a run that diverged?) or overflowed in this dtype; use an earlier checkpoint, or float32")


def check_sampling(*, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   min_p: float | None = None, repetition_penalty: float = 1.0) -> None:
    """Refuse a sampling setting no filter takes: each filter checks its own, and a chat checks
    its settings here when it starts, not at its first answer. ``temperature`` 0 is greedy."""
    if not temperature >= 0:  # NaN too
        raise ValueError(f"temperature={temperature:g} must be >= 0 (0 is greedy)")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k={top_k} must be a positive integer")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p:g} must be in (0, 1] (1 keeps every token)")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p={min_p:g} must be in [0, 1]")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty:g} must be > 0 (1.0 means no penalty)")


def apply_repetition_penalty(logits: torch.Tensor, idx: torch.Tensor, penalty: float,
                             real: torch.Tensor | None = None) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): for each token already in ``idx`` (B, T), divide a
    positive logit by ``penalty`` and multiply a negative one, so it always becomes less likely.
    Tokens are penalised once however often they occur (as in Hugging Face). ``real`` (B, T):
    False at left padding, which is not a token the row has seen."""
    check_sampling(repetition_penalty=penalty)
    counts = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
    ones = torch.ones_like(idx, dtype=torch.int32) if real is None else real.to(torch.int32)
    seen = counts.scatter_add_(-1, idx, ones) > 0
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen (< 1) or flatten (> 1) the distribution. 0 means greedy: see :func:`next_token_probs`."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 here; greedy decoding is temperature=0 "
                         "in next_token_probs/generate")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits (and any tied with the k-th)."""
    check_sampling(top_k=k)
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability mass is at least ``p``; the most likely token is always kept."""
    check_sampling(top_p=p)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    remove_sorted = mass_before >= p  # the set before this token already reached p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): keep tokens with probability >= ``min_p`` times the
    top probability, so the cut-off adapts to how confident the model is."""
    check_sampling(min_p=min_p)
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def filter_logits(logits: torch.Tensor, idx: torch.Tensor | None = None, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                  repetition_penalty: float = 1.0) -> torch.Tensor:
    """Apply the filters in Hugging Face's order (module docstring); ``temperature`` must be > 0.

    ``idx`` (B, T), the tokens so far, is needed only for the repetition penalty.
    """
    if repetition_penalty != 1.0:
        if idx is None:
            raise ValueError("repetition_penalty needs idx, the tokens generated so far")
        logits = apply_repetition_penalty(logits, idx, repetition_penalty)
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p != 1.0:  # 1 keeps every token; the filter refuses values outside (0, 1]
        logits = top_p_filter(logits, top_p)
    if min_p is not None and min_p != 0.0:
        logits = min_p_filter(logits, min_p)
    return logits


def next_token_probs(logits: torch.Tensor, idx: torch.Tensor | None = None, *, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                     repetition_penalty: float = 1.0) -> torch.Tensor:
    """The distribution the next token is drawn from, (..., V) probabilities summing to 1.

    ``temperature=0`` is greedy decoding: all mass on the (penalised) argmax.
    """
    if temperature == 0:
        if repetition_penalty != 1.0:
            logits = filter_logits(logits, idx, repetition_penalty=repetition_penalty)
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).to(torch.float32)
    logits = filter_logits(logits, idx, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p, repetition_penalty=repetition_penalty)
    return logits.float().softmax(dim=-1)


def sample_next(logits: torch.Tensor, idx: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None, **filters: Any) -> torch.Tensor:
    """Draw one token per row from (B, V) ``logits``: returns (B,) token ids."""
    if filters.get("temperature", 1.0) == 0:  # greedy: no random draw, so the generator is untouched
        penalty = filters.get("repetition_penalty", 1.0)
        if penalty != 1.0:
            logits = filter_logits(logits, idx, repetition_penalty=penalty)
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, idx, **filters)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _cache_dtype(model: GPT) -> torch.dtype:
    """The dtype the attention keys will have: autocast's if it is on, else the weights'."""
    device_type = model.transformer.wte.weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return model.transformer.wte.weight.dtype


def stream(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
           repetition_penalty: float = 1.0, stop_tokens: Iterable[int] | None = None,
           pad_token: int | None = None, use_cache: bool = True,
           generator: torch.Generator | None = None,
           attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, a (B,) tensor per step; see :func:`generate`."""
    if idx.dim() != 2:
        raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
    B, T = idx.shape
    if attention_mask is not None:
        if attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask must have the shape of idx {tuple(idx.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask: pad prompts on the left (each row's last token must be real); "
                             "see minigpt.generate.left_pad")
        if bool(attention_mask.all()):  # no padding after all: the plain causal path is faster
            attention_mask = None
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    block_size = model.config.block_size
    if T == 0:
        raise ValueError("the prompt is empty: give at least one token to condition on "
                         "(e.g. a newline, or the tokenizer's end-of-text/BOS token)")
    if T > block_size:
        raise ValueError(f"the prompt has {T} tokens but the model sees at most block_size={block_size}; "
                         f"keep its last {block_size} (idx[:, -{block_size}:])")
    if use_cache and T + max_new_tokens > block_size:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} exceeds "
            f"block_size={block_size}, and the KV cache cannot slide past it; lower max_new_tokens to "
            f"{block_size - T}, or pass use_cache=False to condition on the last {block_size} tokens")
    stops = torch.tensor(sorted(set(stop_tokens or ())), dtype=torch.long, device=idx.device)
    has_stops = len(stops) > 0
    if pad_token is None:
        pad_token = int(stops[0]) if has_stops else 0
    check_sampling(repetition_penalty=repetition_penalty)
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)

    # Eval mode: dropout would make sampling noisy and cached != uncached.
    with evaluating(model), torch.inference_mode():
        idx = idx.to(model.transformer.wte.weight.device)
        stops = stops.to(idx.device)
        cache = model.new_kv_cache(B, T + max_new_tokens, dtype=_cache_dtype(model)) if use_cache else None
        # Every token so far (for the repetition penalty and the uncached path), preallocated
        # so that a step writes one column instead of copying the whole sequence.
        buffer = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)
        buffer[:, :T] = idx
        real = None  # which tokens of buffer are not padding, when some are
        if attention_mask is not None:
            real = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=idx.device)
            real[:, :T] = attention_mask.to(device=idx.device, dtype=torch.bool)
        new = idx  # what the model has not seen yet: the prompt, then one token per step
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for t in range(T, T + max_new_tokens):
            seq = buffer[:, :t]
            if use_cache:  # the cache remembers the prompt's padding after the first step
                mask = real[:, :T] if real is not None and t == T else None
                logits, _ = model(new, kv_cache=cache, last_only=True, attention_mask=mask)
            else:
                mask = real[:, :t][:, -block_size:] if real is not None else None
                logits, _ = model(seq[:, -block_size:], last_only=True, attention_mask=mask)
            # NaN wins argmax, so a broken model would decode greedily to token 0 without a word.
            # Checked once, on the prompt: checking every step cost ~3% of a small model's decoding.
            if t == T and bool(logits.isnan().any()):
                raise NaNLogitsError(_NAN_LOGITS)
            # float32 for the filters: top-p's cumulative sum in bf16 moves in steps of about 0.002
            logits = logits[:, -1, :].float()
            if repetition_penalty != 1.0:
                logits = apply_repetition_penalty(logits, seq, repetition_penalty,
                                                  real[:, :t] if real is not None else None)
            token = sample_next(logits, generator=generator, **filters)
            if not has_stops:  # no row can finish: skip the bookkeeping
                yield token
            else:
                yield token.masked_fill(done, pad_token)
                done = done | torch.isin(token, stops)
                if bool(done.all()):
                    return
            # Finished rows keep decoding their own samples (a pad id may not be a valid
            # token); what they produce is replaced by pad_token above.
            buffer[:, t] = token
            new = buffer[:, t:t + 1]


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float = 1.0, stop_tokens: Iterable[int] | None = None,
             pad_token: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continue each row of ``idx`` (B, T) by up to ``max_new_tokens``; returns (B, T + n).

    temperature=0 is greedy; ``generator`` makes sampling reproducible. A row that emits one of
    ``stop_tokens`` keeps it and is then padded with ``pad_token`` (default: the smallest stop
    token id, like Hugging Face's eos-as-pad), and generation ends early once every row has
    stopped, so n <= max_new_tokens. Prompts of different lengths share a batch left-padded, with
    ``attention_mask`` (B, T) 0 at the padding (:func:`left_pad` makes both): each row then
    continues as it would alone.

    With ``use_cache`` (default) a KV cache sized T + max_new_tokens is preallocated and each step
    feeds only the newest token; that total must fit in ``block_size``. Without the cache the
    model re-reads the last ``block_size`` tokens every step, so generation can run past it.
    The model runs in eval mode (restored afterwards) under ``torch.inference_mode``.
    A model whose logits for the prompt are NaN raises :class:`~minigpt.errors.NaNLogitsError`
    rather than decoding garbage.
    """
    tokens = list(stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                         stop_tokens=stop_tokens, pad_token=pad_token, use_cache=use_cache,
                         generator=generator, attention_mask=attention_mask))
    idx = idx.to(model.transformer.wte.weight.device)
    return torch.cat([idx, torch.stack(tokens, dim=1)], dim=1) if tokens else idx


def beam_search(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, num_beams: int = 4,
                length_penalty: float = 1.0, stop_tokens: Iterable[int] | None = None,
                use_cache: bool = True) -> tuple[torch.Tensor, float]:
    """The most likely continuation of one prompt ``idx`` (1, T) that a beam search finds, as
    (1, T + n) ids, and its score: its tokens' summed log-probability / n ** ``length_penalty``.

    Each step extends each of the ``num_beams`` running sequences by every token, and keeps the
    best ``num_beams`` by summed log-probability. A candidate that emits a stop token (or reaches
    ``max_new_tokens``) is finished, scored with the length penalty (above 1 favours longer
    answers; 0 compares plain sums), and kept among the best ``num_beams`` finished; the search
    ends when no running beam could beat the worst of them. The rules, including which candidates
    may finish, are those of Hugging Face ``transformers``' ``generate(num_beams=...)`` with its
    default ``early_stopping=False``, so both return the same tokens. ``num_beams=1`` is greedy.
    """
    if idx.dim() != 2 or idx.size(0) != 1:
        raise ValueError(f"beam_search continues one prompt of shape (1, T), got {tuple(idx.shape)}; "
                         "call it once per prompt")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams={num_beams} and max_new_tokens={max_new_tokens} must be at least 1")
    T, block_size = idx.size(1), model.config.block_size
    if T + max_new_tokens > block_size:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size={block_size}; "
                         f"lower max_new_tokens to {block_size - T}")
    stops = sorted(set(stop_tokens or ()))
    # Candidates kept per step: enough that num_beams remain running even if the best all stop.
    keep = max(2, 1 + len(stops)) * num_beams
    device = model.transformer.wte.weight.device
    with evaluating(model), torch.inference_mode():
        seqs = idx.to(device).repeat(num_beams, 1)
        # The beams start as copies of one prompt: only the first may spread, or every step would
        # keep num_beams copies of the same continuation.
        scores = torch.full((num_beams,), -1e9, device=device)
        scores[0] = 0.0
        stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
        cache = model.new_kv_cache(num_beams, T + max_new_tokens, dtype=_cache_dtype(model)) if use_cache else None
        new = seqs
        finished: list[tuple[float, torch.Tensor]] = []  # (score, sequence), best first
        improvable = True  # can a running beam still beat the worst finished one?
        for step in range(max_new_tokens):
            logits, _ = model(new, kv_cache=cache, last_only=True) if cache else model(seqs, last_only=True)
            if step == 0 and bool(logits.isnan().any()):
                raise NaNLogitsError(_NAN_LOGITS)
            logprobs = F.log_softmax(logits[:, -1, :].float(), dim=-1) + scores[:, None]
            vocab = logprobs.size(-1)
            top, flat = logprobs.view(-1).topk(keep)
            beam, token = flat // vocab, flat % vocab
            candidates = torch.cat([seqs[beam], token[:, None]], dim=1)
            ends = torch.isin(token, stop_ids) | (step == max_new_tokens - 1)
            # Only the best num_beams candidates may finish (the rest are spares for the running set).
            if improvable:
                for i in range(num_beams):
                    if ends[i]:
                        finished.append((float(top[i]) / (step + 1) ** length_penalty, candidates[i]))
                finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
            running = (~ends).nonzero().squeeze(1)[:num_beams]
            if len(running) < num_beams:  # every candidate ended (the last step)
                break
            seqs, scores = candidates[running], top[running]
            if cache is not None:
                cache.reorder(beam[running])
            new = seqs[:, -1:]
            best_running = float(scores[0]) / (step + 1) ** length_penalty
            improvable = improvable and (len(finished) < num_beams or best_running > finished[-1][0])
            if not improvable:
                break
        score, best = finished[0]
    return best[None, :].clone(), score  # cloned outside inference mode: a tensor a caller may train on


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, **kwargs: Any) -> str:
    """Encode ``prompt``, generate, and decode the continuation only (up to, not including, the
    first stop token). ``kwargs`` go to :func:`generate`."""
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    stops = set(kwargs.pop("stop_tokens", None) or ())  # read once: it may be a one-shot iterator
    new = generate(model, idx, max_new_tokens, stop_tokens=stops, **kwargs)[0, idx.size(1):].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:cut])


def left_pad(prompts: Sequence[Sequence[int]], pad_token: int = 0, *,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch: ``(idx, attention_mask)``, each (B, longest),
    the shorter prompts preceded by ``pad_token`` where the mask is 0. Left, not right: every row
    then ends at its last real token, so the next column is every row's next token."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad needs at least one prompt, and each at least one token")
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_token, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return idx.to(device), mask.to(device)


def complete(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             stop_tokens: Sequence[int] = (), batch_size: int = 64, temperature: float = 0.0,
             generator: torch.Generator | None = None, **filters: Any) -> list[list[int]]:
    """The continuation of each prompt (a list of token ids, of any lengths), greedy by default.

    Prompts go through :func:`generate` ``batch_size`` at a time, shortest first (so a batch
    holds similar lengths), left-padded to the longest of their batch (:func:`left_pad`). A continuation ends with its stop token, if it
    emitted one (the padding after it is cut off); ``temperature`` and ``filters`` (top_k,
    top_p, ...) are as in :func:`generate`.
    """
    block = model.config.block_size
    for i, p in enumerate(prompts):
        if len(p) + max_new_tokens > block:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it does "
                             f"not fit the model's block_size={block}: use shorter prompts (fewer few-shot examples) "
                             "or fewer new tokens")
    device = model.transformer.wte.weight.device
    stops = set(stop_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(prompts), batch_size):
        rows = order[start:start + batch_size]
        idx, mask = left_pad([prompts[i] for i in rows], device=device)
        new = generate(model, idx, max_new_tokens, temperature=temperature, stop_tokens=stop_tokens,
                       generator=generator, attention_mask=mask, **filters)[:, idx.size(1):]
        for i, ids in zip(rows, new.tolist()):
            cut = next((j + 1 for j, t in enumerate(ids) if t in stops), len(ids))
            out[i] = ids[:cut]
    return out
