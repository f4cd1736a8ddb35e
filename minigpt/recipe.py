"""One recipe per scale: every size and setting of the book, stage by stage, in one frozen tree.

A :class:`Recipe` holds what each chapter's stage needs (tokenizer, model, pretraining, SFT and
LoRA, the RLHF stages, the appendix chapters), so a notebook never holds a constant of its own
and never branches on scale: it reads ``R = minigpt.recipe()`` and uses ``R.sft.steps``.
Four named recipes (:data:`RECIPES`) cover a CI machine (``ci``), a laptop CPU (``cpu``), one
Colab-class GPU (``gpu``) and GPT-2 124M-class runs under ``torchrun`` (``full``). Any field can
be overridden by its dotted path, here and on the command line (``--sft.steps 800``).

How each setting was chosen, with the command that reproduces it, is in the book's page
"How the recipes were chosen" (``book/recipes.md``); the code keeps only the reasons.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Literal

import torch

from minigpt.data import CORPORA
from minigpt.rlhf.dpo import DPOConfig
from minigpt.rlhf.grpo import GRPOConfig
from minigpt.rlhf.ppo import PPOConfig
from minigpt.train import DTYPES, PARALLEL

__all__ = ["RECIPES", "Recipe", "check_device", "default_recipe_name", "flatten", "override", "parse_value", "recipe"]

#: Sizes and counts that must be at least 1 (0 fails deep inside a run, as a division by zero or an
#: empty tensor).
_POSITIVE = ("tokenizer.corpus_chars", "tokenizer.vocab_size", "model.n_layer", "model.n_head", "model.n_embd",
             "model.block_size", "pretrain.batch_size", "pretrain.total_batch_tokens", "sft.batch_size", "lora.rank",
             "chat.batch_size", "chat.max_tokens", "chat.reply_tokens", "instruct.rows", "instruct.batch_size",
             "instruct.max_tokens", "instruct.n_test",
             "rlhf.ppo.batch_size", "rlhf.dpo.batch_size", "rlhf.grpo.prompts_per_step", "classify.batch_size",
             "classify.lora_rank", "generation.rows", "blocks.batch_size", "continual.batch_size",
             "continual.lora_rank", "peft.steps", "peft.batch_size", "peft.lora_rank", "peft.bottleneck",
             "peft.prefix_length", "peft.prompt_length", "honesty.batch_size", "honesty.n_test",
             "reasoning.digits", "reasoning.n_train", "reasoning.n_test", "reasoning.n_layer", "reasoning.n_head",
             "reasoning.n_embd", "reasoning.steps", "reasoning.batch_size", "reasoning.grpo.prompts_per_step",
             "vision.patch", "vision.batch_size", "objectives.n_layer",
             "objectives.n_head", "objectives.n_embd", "objectives.block_size", "objectives.steps",
             "objectives.batch_size", "objectives.n_test", "classify.n_test", "continual.n_test_b",
             "rlhf.max_new_tokens", "rlhf.reward.steps")
#: Counts that may be None (all there are) but otherwise must be at least 1 (a negative count cut
#: the held-out set from the end, silently).
_POSITIVE_OR_ALL = ("sft.n_test", "rlhf.n_test", "continual.n_test_a")


def _torch_device(device: str) -> torch.device:
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None


@dataclass(frozen=True)
class TokenizerRecipe:
    """Chapter 1: the BPE tokenizer trained on the corpus, or GPT-2's own."""

    kind: str  # "bpe" (trained on the corpus to vocab_size) or "gpt2"
    corpus_chars: int  # characters of the corpus's training text the BPE learns from
    vocab_size: int  # 256 byte tokens + merges + specials (the padded model vocabulary for "gpt2")


@dataclass(frozen=True)
class ObjectivesRecipe:
    """Chapter 0: one tiny GPT shape trained twice on Shakespeare's characters, with GPT's causal
    objective and with BERT's masked one (:func:`minigpt.objectives.compare_objectives`)."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # characters per window
    steps: int  # each model's optimizer steps
    batch_size: int  # windows per step
    learning_rate: float
    n_test: int  # held-out windows scored (evenly spaced over the last tenth of the text)
    # An encoder can locate a masked token's neighbours from the position embeddings alone (a
    # causal mask also tells a position how many tokens precede it). RoPE hands attention their
    # distance; with GPT-2's learned table the masked model of `ci` was still guessing the commonest
    # character after its 300 steps (chapter 0, exercise 4).
    position: str = "rope"
    mask_rate: float = 0.15  # BERT's share of positions to restore


@dataclass(frozen=True)
class ModelRecipe:
    """Chapters 2-3: the GPT's shape (its vocabulary comes from the tokenizer)."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int


@dataclass(frozen=True)
class OptimRecipe:
    """AdamW and its schedule, shared by every stage that trains with the Trainer."""

    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95  # GPT-3's: steadier than 0.999 for language models
    grad_clip: float = 1.0  # 0 turns clipping off
    min_lr_ratio: float = 0.1  # cosine decays to a tenth of the peak


@dataclass(frozen=True)
class PretrainRecipe:
    """Chapter 4: pretraining, and the chapter's optimiser experiments."""

    corpus: str  # a name in minigpt.data.CORPORA
    batch_size: int  # sequences per micro-batch per process
    total_batch_tokens: int  # tokens per optimizer step across processes (sets grad_accum)
    steps: int
    warmup_steps: int
    learning_rate: float
    eval_interval: int  # also when checkpoints are written and a sample is printed
    experiment_steps: int  # each of the chapter's by-hand optimiser runs
    sgd_learning_rate: float  # plain SGD needs a far larger step than AdamW
    resume_steps: int = 20  # the kill-and-resume check: bitwise equality needs no long run
    # > 0: a checkpoint due at eval_interval is skipped while the last one took more than this share
    # of the time since it (TrainConfig.checkpoint_budget); the end and SIGTERM always save.
    checkpoint_budget: float = 0.0
    # > 0: HellaSwag's acc_norm on its first this many validation items at every evaluation (from
    # the Hub; 10042 is all of them), the figure GPT-2 124M is compared by (minigpt.hellaswag).
    hellaswag: int = 0


@dataclass(frozen=True)
class SFTRecipe:
    """Chapter 5: full fine-tuning on arithmetic (the run the RLHF stages start from)."""

    base: str  # "pretrained" or "fresh": the better start at this size
    steps: int
    batch_size: int  # conversations per micro-batch
    learning_rate: float
    warmup_steps: int
    max_operand: int  # sums and differences of 0..max_operand
    n_test: int | None  # held-out problems for exact match (None: all of them)
    eval_interval: int
    keep_steps: tuple[int, ...]  # checkpoints kept beside the last one: RL starts from one
    train_examples: int = 20_000  # of a generated task or the mixture (arithmetic enumerates every problem)


@dataclass(frozen=True)
class LoRARecipe:
    """Chapter 5: LoRA on the same task (data, batches and warmup are SFT's)."""

    steps: int  # LoRA learns more slowly per step: it gets more of them
    learning_rate: float  # adapters want a larger step than full weights
    rank: int
    alpha: float  # the update is (alpha / rank) B A: a smaller scale trains the adapters more gently
    token_rows: int  # embedding rows that train: the chat tokens, then the answers' commonest
    train_also: tuple[str, ...]  # small modules that train in full (apply_lora's train_also)


@dataclass(frozen=True)
class ChatRecipe:
    """Chapter 5's chat model: SFT of the pretrained model on human dialogue (chatterbot-corpus) with
    arithmetic mixed in, so that it talks and still adds up."""

    language: str  # a language of the corpus: "english", "chinese", ...
    steps: int
    batch_size: int  # conversations per micro-batch
    learning_rate: float
    warmup_steps: int
    arithmetic: float  # the share of the training conversations that are arithmetic problems
    max_tokens: int  # longer conversations are left out (the corpus's code listings): a small model cannot learn them
    eval_interval: int
    reply_tokens: int = 64  # the longest reply sampled when measuring how often replies end their turn


@dataclass(frozen=True)
class InstructRecipe:
    """Chapter 5, online: OpenAI's GPT-2 instruction-tuned on an instruction set from the Hub.

    Only when the Hub is reachable (offline the chapter says what this would do and goes on). The
    ``ci`` sizes are what the tests run on a GPT-2-shaped stand-in; ``cpu`` is a short taste on a
    laptop (a 124M model trains at a few seconds a step there); ``gpu`` is the real run.
    """

    weights: str  # a GPT-2 on the Hub ("gpt2" 124M, "gpt2-medium" 355M) or a folder in its layout
    data: str  # an instruction set of minigpt.tasks.data.ONLINE ("alpaca", "smol-smoltalk", ...)
    rows: int  # rows streamed from it; those whose first question hashes to "test" (about 10%) are held out
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    max_tokens: int  # longer conversations are left out
    eval_interval: int
    n_test: int  # held-out conversations measured at the end
    data_files: str = ""  # a local JSON/JSONL file of rows in data's schema, read instead of the Hub


@dataclass(frozen=True)
class RewardRecipe:
    """Chapter 6: the reward model trained on the rule's preferences."""

    steps: int
    learning_rate: float


@dataclass(frozen=True)
class RLHFRecipe:
    """Chapter 6: where RL starts, the shared evaluation, and each stage's own settings."""

    start_step: int  # the policy: chapter 5's SFT run at this kept step
    n_test: int | None  # held-out problems for exact match, KL and pair accuracy (None: all)
    pair_samples: int  # responses per prompt labelled to make a pair
    pair_prompts: int  # prompts turned into pairs (train split)
    reward: RewardRecipe
    ppo: PPOConfig
    dpo: DPOConfig
    grpo: GRPOConfig
    max_new_tokens: int = 6  # answers are a few digits and <|end|>
    test_on_all: bool = False  # evaluate on every problem, train split too (one-digit sums hold out only 17)


@dataclass(frozen=True)
class ClassifyRecipe:
    """Chapter 8: fine-tuning for classification."""

    n_train: int
    n_test: int
    steps: int
    batch_size: int
    learning_rate: float  # full fine-tuning
    head_learning_rate: float  # a frozen trunk: only the head moves, so it takes larger steps
    lora_learning_rate: float
    lora_rank: int
    warmup_steps: int
    max_clauses: int = 3  # clauses per review: the sentiment rule reads every one, so fewer is easier


@dataclass(frozen=True)
class GenerationRecipe:
    """Chapter 7: the decoding comparison and the KV-cache timing."""

    rows: int  # sequences generated per decoding setting
    timing_reps: int  # repetitions per timed decoding step


@dataclass(frozen=True)
class BlocksRecipe:
    """Chapter 9: GPT-2's block against the modern one, at equal compute."""

    steps: int
    batch_size: int


@dataclass(frozen=True)
class ContinualRecipe:
    """Chapter 10: learning task B after task A (warmup is SFT's)."""

    n_train_b: int  # comparisons to learn ("Which is larger, 37 or 48?")
    max_operand: int  # B's numbers are 0..max_operand
    batch_size: int  # conversations per step
    n_test_a: int | None  # held-out arithmetic problems (None: as many as the RLHF stages use)
    n_test_b: int  # held-out comparisons
    steps: int  # task B, sequential and replay
    learning_rate: float
    replay: float  # the fraction of the B-stage data that is A's, replayed
    ewc_strength: float  # EWC's lambda: how hard each weight is pulled back to A's, per unit of Fisher
    fisher_examples: int  # A's training conversations the Fisher information is averaged over
    lora_steps: int
    lora_learning_rate: float
    lora_rank: int


@dataclass(frozen=True)
class PEFTRecipe:
    """Chapter 13: chapter 10's task B learned by six methods (:mod:`minigpt.peft_compare`),
    each for the same steps and batches; the sizes make LoRA and adapters train about as many
    parameters."""

    steps: int
    batch_size: int  # conversations per step
    warmup_steps: int
    full_learning_rate: float  # every weight trains: the smallest step
    learning_rate: float  # LoRA and adapters: new matrices
    vector_learning_rate: float  # (IA)^3, prefix and prompt tuning: a few vectors, which want larger steps
    lora_rank: int
    lora_alpha: float  # LoRA's update is scaled by lora_alpha / lora_rank
    bottleneck: int  # the adapters' width
    prefix_length: int  # learned keys and values per layer
    prompt_length: int  # soft tokens
    train_also: tuple[str, ...] = ("ln_1", "ln_2", "ln_f")  # trained beside every method's own parameters
    # "parallel" (He et al. 2022: beside each attention and MLP, reading their input, times
    # adapter_scale) or "sequential" (Houlsby et al.: after each output projection); the same
    # parameters. book/recipes.md has what each placement, scale and alpha measured.
    adapter_placement: Literal["sequential", "parallel"] = "parallel"
    adapter_scale: float = 1.0  # a parallel adapter's output scale (He et al. used 4)


@dataclass(frozen=True)
class HonestyRecipe:
    """Chapter 12: closed-book questions, some about people the model cannot know."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    n_train: int  # training questions (facts drawn with replacement, and strangers)
    n_test: int  # held-out strangers
    shares: tuple[float, ...]  # the shares of stranger questions in training to compare
    share: float  # the honest model's share, one of ``shares``


@dataclass(frozen=True)
class ReasoningRecipe:
    """Chapter 14: long addition answered directly or with its working, then GRPO on the working.

    The models are trained from random weights, on bytes, with rotary positions: their shape is
    here rather than in ``model``, and their block fits the longest sum measured."""

    digits: int  # trained on sums whose longer number has 1..digits digits
    test_digits: int  # measured on every length 1..test_digits: past ``digits``, lengths never trained on
    n_train: int  # training sums (the same questions for both formats)
    n_test: int  # held-out sums per length (fewer where a length has fewer: one digit has 10)
    n_layer: int
    n_head: int
    n_embd: int
    steps: int  # each model's, the direct one's and the working one's alike
    batch_size: int
    learning_rate: float
    warmup_steps: int
    shots: int  # worked examples in the few-shot prompt of the pretrained model (they must fit its block)
    grpo: GRPOConfig  # on the working model; max_completion_length is set by the longest sum
    grpo_digits: tuple[int, ...]  # the lengths of GRPO's prompts (past ``digits``: no worked answers needed)


@dataclass(frozen=True)
class VisionRecipe:
    """Chapter 11: a GPT that captions 8x8 digits."""

    patch: int  # pixels per side of a patch
    steps: int
    batch_size: int
    learning_rate: float


@dataclass(frozen=True)
class Recipe:
    """Every setting of one scale. ``seed`` seeds every stage: 1337 is the book's draw, and
    other values show how far an outcome moves with the draw alone."""

    name: str
    device: str
    dtype: str  # the autocast dtype, one of minigpt.train.DTYPES; "auto" picks it by device
    compile: bool  # torch.compile the model where it pays off
    tokenizer: TokenizerRecipe
    model: ModelRecipe
    objectives: ObjectivesRecipe
    pretrain: PretrainRecipe
    sft: SFTRecipe
    lora: LoRARecipe
    chat: ChatRecipe
    instruct: InstructRecipe
    rlhf: RLHFRecipe
    classify: ClassifyRecipe
    generation: GenerationRecipe
    blocks: BlocksRecipe
    continual: ContinualRecipe
    peft: PEFTRecipe
    honesty: HonestyRecipe
    reasoning: ReasoningRecipe
    vision: VisionRecipe
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    seed: int = 1337
    # With more than one process: "ddp" (each holds the whole model) or "fsdp" (each a shard of
    # the weights, gradients and optimizer state: for models that do not fit one GPU whole).
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        for path in _POSITIVE:
            value = reduce(getattr, path.split("."), self)
            if value < 1:
                raise ValueError(f"{path}={value} must be at least 1")
        for path in _POSITIVE_OR_ALL:
            value = reduce(getattr, path.split("."), self)
            if value is not None and value < 1:
                raise ValueError(f"{path}={value} must be at least 1, or None for all there are")
        _torch_device(self.device)
        if self.pretrain.corpus not in CORPORA:
            raise ValueError(f"pretrain.corpus={self.pretrain.corpus!r} is not a corpus; choose one of {', '.join(CORPORA)}")
        if self.model.n_embd % self.model.n_head:
            raise ValueError(f"model.n_embd={self.model.n_embd} must be a multiple of model.n_head={self.model.n_head}")
        if not 0 < self.objectives.mask_rate <= 1:
            raise ValueError(f"objectives.mask_rate={self.objectives.mask_rate} must be in (0, 1]")
        if self.objectives.n_embd % self.objectives.n_head:
            raise ValueError(f"objectives.n_embd={self.objectives.n_embd} must be a multiple of "
                             f"objectives.n_head={self.objectives.n_head}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")
        if self.tokenizer.kind not in ("bpe", "gpt2"):
            raise ValueError(f"tokenizer.kind={self.tokenizer.kind!r} must be 'bpe' or 'gpt2'")
        if self.chat.max_tokens > self.model.block_size + 1:
            raise ValueError(f"chat.max_tokens={self.chat.max_tokens} must be at most model.block_size + 1 = "
                             f"{self.model.block_size + 1}: a conversation is read whole")
        if not 0 <= self.chat.arithmetic < 1:
            raise ValueError(f"chat.arithmetic={self.chat.arithmetic} must be in [0, 1): the share of arithmetic "
                             "among the chat model's training conversations")
        if self.rlhf.start_step not in self.sft.keep_steps:
            raise ValueError(f"rlhf.start_step={self.rlhf.start_step} must be one of sft.keep_steps="
                             f"{self.sft.keep_steps}: RL starts from a checkpoint the SFT run keeps")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel={self.parallel!r} must be one of {', '.join(PARALLEL)}")
        if self.honesty.share not in self.honesty.shares or not all(0 <= x <= 1 for x in self.honesty.shares):
            raise ValueError(f"honesty.share={self.honesty.share} must be one of honesty.shares={self.honesty.shares}, "
                             "each a share of the training questions (0 to 1)")
        r = self.reasoning
        if not r.digits < r.test_digits <= 25:  # 26 place markers, one kept for the final carry
            raise ValueError(f"reasoning.test_digits={r.test_digits} must be above reasoning.digits={r.digits} (the "
                             "lengths past it measure length generalisation) and at most 25")
        if r.n_embd % r.n_head:
            raise ValueError(f"reasoning.n_embd={r.n_embd} must be a multiple of reasoning.n_head={r.n_head}")
        if not r.grpo_digits or not all(1 <= d <= r.test_digits for d in r.grpo_digits):
            raise ValueError(f"reasoning.grpo_digits={r.grpo_digits} must name lengths from 1 to "
                             f"reasoning.test_digits={r.test_digits}")


#: RL from SFT step 1,200 on two-digit sums: measured at ``cpu``; ``gpu`` and ``full`` run it as it
#: is until it is tuned at their scale (their SFT runs keep step 1,200 too).
_RLHF_FROM_STEP_1200 = RLHFRecipe(
    start_step=1200, n_test=500, pair_samples=4, pair_prompts=2000,
    reward=RewardRecipe(steps=200, learning_rate=1e-3),
    ppo=PPOConfig(steps=40, batch_size=64, learning_rate=1e-4, kl_coef=0.1, response_length=6),
    dpo=DPOConfig(steps=400, batch_size=32, learning_rate=5e-4, rpo_alpha=1.0),
    grpo=GRPOConfig(steps=200, prompts_per_step=16, learning_rate=1e-4, max_completion_length=6))

#: The four named recipes, by profile name: ``ci``, ``cpu``, ``gpu`` and ``full``.
RECIPES: dict[str, Recipe] = {
    "ci": Recipe(
        name="ci", device="cpu", dtype="auto", compile=False,
        tokenizer=TokenizerRecipe(kind="bpe", corpus_chars=200_000, vocab_size=512),
        model=ModelRecipe(n_layer=2, n_head=2, n_embd=64, block_size=64),
        objectives=ObjectivesRecipe(n_layer=2, n_head=2, n_embd=64, block_size=32, steps=300, batch_size=16,
                                    learning_rate=3e-3, n_test=2000),
        pretrain=PretrainRecipe(corpus="shakespeare", batch_size=8, total_batch_tokens=8 * 64, steps=100,
                                warmup_steps=10, learning_rate=3e-3, eval_interval=50, experiment_steps=6,
                                sgd_learning_rate=0.3),
        # From random weights: at this size a 100-step Shakespeare model is a worse start.
        sft=SFTRecipe(base="fresh", steps=200, batch_size=128, learning_rate=5e-3, warmup_steps=20,
                      max_operand=9, n_test=None, eval_interval=100, keep_steps=(120,)),
        lora=LoRARecipe(steps=400, learning_rate=1e-2, rank=2, alpha=4.0, token_rows=16,
                        train_also=("ln_1", "ln_2", "ln_f")),
        chat=ChatRecipe(language="english", steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=20,
                        arithmetic=0.5, max_tokens=64, eval_interval=100, reply_tokens=32),
        # Sized for the tests' random GPT-2-shaped stand-in (tests/test_instruct.py); real GPT-2 would want ~1e-4.
        instruct=InstructRecipe(weights="gpt2", data="alpaca", rows=200, steps=20, batch_size=8, learning_rate=1e-2,
                                warmup_steps=2, max_tokens=96, eval_interval=10, n_test=16),
        rlhf=RLHFRecipe(start_step=120, n_test=None, pair_samples=4, pair_prompts=400, test_on_all=True,
                        reward=RewardRecipe(steps=60, learning_rate=1e-3),
                        ppo=PPOConfig(steps=40, batch_size=64, learning_rate=1e-4, kl_coef=0.1, response_length=6),
                        dpo=DPOConfig(steps=600, batch_size=32, learning_rate=5e-4, rpo_alpha=1.0),
                        grpo=GRPOConfig(steps=100, prompts_per_step=16, learning_rate=1e-4, max_completion_length=6)),
        # Two-clause reviews: with three, this model's sentiment F1 ended 0.40-0.54 over seeds.
        classify=ClassifyRecipe(n_train=2000, n_test=300, steps=300, batch_size=32, learning_rate=3e-3,
                                head_learning_rate=1e-2, lora_learning_rate=1e-2, lora_rank=4, warmup_steps=10,
                                max_clauses=2),
        generation=GenerationRecipe(rows=8, timing_reps=15),
        blocks=BlocksRecipe(steps=100, batch_size=2),
        continual=ContinualRecipe(n_train_b=2000, max_operand=99, batch_size=32, n_test_a=None, n_test_b=200,
                                  steps=60,
                                  learning_rate=3e-3, replay=0.5, ewc_strength=1e4, fisher_examples=200,
                                  lora_steps=200, lora_learning_rate=1e-2,
                                  lora_rank=4),
        peft=PEFTRecipe(steps=400, batch_size=128, warmup_steps=20, full_learning_rate=3e-3, learning_rate=2e-2,
                        vector_learning_rate=1e-1, lora_rank=2, lora_alpha=4.0, bottleneck=8, prefix_length=8, prompt_length=8),
        vision=VisionRecipe(patch=2, steps=200, batch_size=32, learning_rate=6e-3),
        reasoning=ReasoningRecipe(digits=2, test_digits=4, n_train=5000, n_test=50, n_layer=3, n_head=4, n_embd=96,
                                  steps=400, batch_size=32, learning_rate=3e-3, warmup_steps=20, shots=1,
                                  grpo=GRPOConfig(steps=10, prompts_per_step=8, learning_rate=5e-5),
                                  grpo_digits=(2,)),
        honesty=HonestyRecipe(steps=1000, batch_size=32, learning_rate=1e-2, warmup_steps=20, n_train=20000, n_test=100,
                              shares=(0.0, 0.2), share=0.2),
    ),
    "cpu": Recipe(
        name="cpu", device="cpu", dtype="auto", compile=False,
        tokenizer=TokenizerRecipe(kind="bpe", corpus_chars=2_000_000, vocab_size=2048),
        model=ModelRecipe(n_layer=4, n_head=4, n_embd=128, block_size=128),
        objectives=ObjectivesRecipe(n_layer=2, n_head=2, n_embd=64, block_size=32, steps=600, batch_size=32,
                                    learning_rate=3e-3, n_test=5000),
        pretrain=PretrainRecipe(corpus="shakespeare", batch_size=16, total_batch_tokens=16 * 128, steps=2000,
                                warmup_steps=100, learning_rate=2e-3, eval_interval=250, experiment_steps=125,
                                sgd_learning_rate=0.3),
        # 3,000 steps: the sudden drop in loss comes anywhere from step 700 to 1,300 with the draw,
        # and 2,000 left some draws short of the target (book/recipes.md).
        sft=SFTRecipe(base="pretrained", steps=3000, batch_size=64, learning_rate=3e-3, warmup_steps=50,
                      max_operand=99, n_test=500, eval_interval=500, keep_steps=(1200,)),
        lora=LoRARecipe(steps=5000, learning_rate=1e-2, rank=16, alpha=8.0, token_rows=16,
                        train_also=("ln_1", "ln_2", "ln_f", "wpe")),
        chat=ChatRecipe(language="english", steps=2000, batch_size=64, learning_rate=2e-3, warmup_steps=50,
                        arithmetic=0.95, max_tokens=96, eval_interval=250),
        instruct=InstructRecipe(weights="gpt2", data="alpaca", rows=2000, steps=40, batch_size=4, learning_rate=1e-4,
                                warmup_steps=10, max_tokens=192, eval_interval=50, n_test=50),
        rlhf=_RLHF_FROM_STEP_1200,
        classify=ClassifyRecipe(n_train=4000, n_test=500, steps=150, batch_size=32, learning_rate=2e-3,
                                head_learning_rate=1e-2, lora_learning_rate=5e-3, lora_rank=4, warmup_steps=20),
        generation=GenerationRecipe(rows=8, timing_reps=40),
        blocks=BlocksRecipe(steps=100, batch_size=2),
        continual=ContinualRecipe(n_train_b=4000, max_operand=99, batch_size=32, n_test_a=300, n_test_b=300,
                                  steps=400,
                                  learning_rate=2e-3, replay=0.5, ewc_strength=300.0, fisher_examples=500,
                                  lora_steps=400, lora_learning_rate=1e-2,
                                  lora_rank=8),
        peft=PEFTRecipe(steps=800, batch_size=128, warmup_steps=40, full_learning_rate=2e-3, learning_rate=2e-2,
                        vector_learning_rate=1e-1, lora_rank=6, lora_alpha=6.0, bottleneck=24, prefix_length=8, prompt_length=8),
        vision=VisionRecipe(patch=2, steps=200, batch_size=32, learning_rate=4e-3),
        reasoning=ReasoningRecipe(digits=3, test_digits=5, n_train=20000, n_test=100, n_layer=3, n_head=4, n_embd=128,
                                  steps=800, batch_size=32, learning_rate=3e-3, warmup_steps=50, shots=4,
                                  grpo=GRPOConfig(steps=40, prompts_per_step=8, learning_rate=1e-4),
                                  grpo_digits=(3,)),
        honesty=HonestyRecipe(steps=300, batch_size=32, learning_rate=3e-3, warmup_steps=50, n_train=20000, n_test=300,
                              shares=(0.0, 0.003, 0.01, 0.03, 0.1), share=0.1),
    ),
    "gpu": Recipe(
        name="gpu", device="cuda", dtype="auto", compile=True,
        tokenizer=TokenizerRecipe(kind="bpe", corpus_chars=20_000_000, vocab_size=8192),
        model=ModelRecipe(n_layer=6, n_head=6, n_embd=384, block_size=256),
        objectives=ObjectivesRecipe(n_layer=4, n_head=4, n_embd=128, block_size=64, steps=2000, batch_size=64,
                                    learning_rate=2e-3, n_test=10000),
        pretrain=PretrainRecipe(corpus="tinystories", batch_size=64, total_batch_tokens=64 * 256, steps=5000,
                                warmup_steps=200, learning_rate=1e-3, eval_interval=250, experiment_steps=312,
                                sgd_learning_rate=0.3),
        sft=SFTRecipe(base="pretrained", steps=2000, batch_size=128, learning_rate=1e-3, warmup_steps=100,
                      max_operand=99, n_test=1000, eval_interval=250, keep_steps=(1200,)),
        lora=LoRARecipe(steps=3000, learning_rate=5e-3, rank=16, alpha=32.0, token_rows=32,
                        train_also=("ln_1", "ln_2", "ln_f", "wpe")),
        chat=ChatRecipe(language="english", steps=2000, batch_size=64, learning_rate=1e-3, warmup_steps=50,
                        arithmetic=0.95, max_tokens=256, eval_interval=250),
        # Batches of 16: 32 conversations of up to 512 tokens, with logits over 50,261 ids, risk a T4's 16 GB.
        instruct=InstructRecipe(weights="gpt2", data="alpaca", rows=20000, steps=2000, batch_size=16,
                                learning_rate=5e-5, warmup_steps=50, max_tokens=512, eval_interval=250, n_test=200),
        rlhf=_RLHF_FROM_STEP_1200,
        classify=ClassifyRecipe(n_train=20000, n_test=2000, steps=1000, batch_size=64, learning_rate=3e-4,
                                head_learning_rate=1e-2, lora_learning_rate=3e-3, lora_rank=8, warmup_steps=50),
        generation=GenerationRecipe(rows=8, timing_reps=40),
        blocks=BlocksRecipe(steps=100, batch_size=8),
        continual=ContinualRecipe(n_train_b=8000, max_operand=99, batch_size=64, n_test_a=1000, n_test_b=900,
                                  steps=1000,
                                  learning_rate=5e-4, replay=0.5, ewc_strength=300.0, fisher_examples=1000,
                                  lora_steps=1500, lora_learning_rate=3e-3,
                                  lora_rank=16),
        peft=PEFTRecipe(steps=1000, batch_size=64, warmup_steps=50, full_learning_rate=5e-4, learning_rate=3e-3,
                        vector_learning_rate=3e-2, lora_rank=8, lora_alpha=16.0, bottleneck=32, prefix_length=16, prompt_length=16),
        vision=VisionRecipe(patch=2, steps=200, batch_size=32, learning_rate=2e-3),
        reasoning=ReasoningRecipe(digits=8, test_digits=12, n_train=100000, n_test=500, n_layer=6, n_head=8, n_embd=256,
                                  steps=5000, batch_size=64, learning_rate=1e-3, warmup_steps=200, shots=8,
                                  grpo=GRPOConfig(steps=200, prompts_per_step=16, learning_rate=5e-5),
                                  grpo_digits=(8, 9)),
        honesty=HonestyRecipe(steps=500, batch_size=64, learning_rate=3e-4, warmup_steps=50, n_train=40000, n_test=1000,
                              shares=(0.0, 0.003, 0.01, 0.03, 0.1), share=0.1),
    ),
    "full": Recipe(
        name="full", device="cuda", dtype="auto", compile=True,
        tokenizer=TokenizerRecipe(kind="gpt2", corpus_chars=100_000_000, vocab_size=50304),
        model=ModelRecipe(n_layer=12, n_head=12, n_embd=768, block_size=1024),
        objectives=ObjectivesRecipe(n_layer=4, n_head=4, n_embd=128, block_size=64, steps=2000, batch_size=64,
                                    learning_rate=2e-3, n_test=10000),
        # GPT-3 paper's 125M recipe: 0.5M-token batches, 10B tokens, 375M-token warmup.
        pretrain=PretrainRecipe(corpus="fineweb-edu", batch_size=64, total_batch_tokens=524_288, steps=19073,
                                warmup_steps=715, learning_rate=6e-4, eval_interval=250, experiment_steps=1192,
                                sgd_learning_rate=0.3, checkpoint_budget=0.01, hellaswag=10042),
        sft=SFTRecipe(base="pretrained", steps=2000, batch_size=128, learning_rate=3e-4, warmup_steps=100,
                      max_operand=99, n_test=1000, eval_interval=250, keep_steps=(1200,)),
        lora=LoRARecipe(steps=3000, learning_rate=3e-3, rank=16, alpha=32.0, token_rows=32,
                        train_also=("ln_1", "ln_2", "ln_f", "wpe")),
        chat=ChatRecipe(language="english", steps=2000, batch_size=64, learning_rate=3e-4, warmup_steps=50,
                        arithmetic=0.95, max_tokens=512, eval_interval=250),
        instruct=InstructRecipe(weights="gpt2-medium", data="smol-smoltalk", rows=100000, steps=3000, batch_size=32,
                                learning_rate=3e-5, warmup_steps=100, max_tokens=1024, eval_interval=500, n_test=500),
        rlhf=_RLHF_FROM_STEP_1200,
        classify=ClassifyRecipe(n_train=20000, n_test=2000, steps=1000, batch_size=64, learning_rate=1e-4,
                                head_learning_rate=1e-2, lora_learning_rate=1e-3, lora_rank=16, warmup_steps=50),
        generation=GenerationRecipe(rows=8, timing_reps=40),
        blocks=BlocksRecipe(steps=100, batch_size=8),
        continual=ContinualRecipe(n_train_b=8000, max_operand=99, batch_size=64, n_test_a=1000, n_test_b=900,
                                  steps=1000,
                                  learning_rate=2e-4, replay=0.5, ewc_strength=300.0, fisher_examples=1000,
                                  lora_steps=1500, lora_learning_rate=2e-3,
                                  lora_rank=16),
        peft=PEFTRecipe(steps=1000, batch_size=64, warmup_steps=50, full_learning_rate=2e-4, learning_rate=2e-3,
                        vector_learning_rate=3e-2, lora_rank=16, lora_alpha=32.0, bottleneck=64, prefix_length=16, prompt_length=16),
        vision=VisionRecipe(patch=2, steps=200, batch_size=32, learning_rate=1.2e-3),
        reasoning=ReasoningRecipe(digits=10, test_digits=16, n_train=200000, n_test=1000, n_layer=8, n_head=8,
                                  n_embd=512, steps=10000, batch_size=128, learning_rate=5e-4, warmup_steps=500, shots=8,
                                  grpo=GRPOConfig(steps=300, prompts_per_step=32, learning_rate=2e-5),
                                  grpo_digits=(10, 11)),
        honesty=HonestyRecipe(steps=500, batch_size=64, learning_rate=3e-4, warmup_steps=50, n_train=40000, n_test=1000,
                              shares=(0.0, 0.003, 0.01, 0.03, 0.1), share=0.1),
    ),
}


def check_device(device: str) -> None:
    """Refuse a device this machine lacks now, before a run starts, rather than with torch's error
    at the first tensor moved there. (A recipe may name one: ``gpu`` is read on laptops too.)"""
    d = _torch_device(device)
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (d.index or 0) >= count:
            raise ValueError(f"device={device!r}, but torch {torch.__version__} sees {count} CUDA GPU(s) here; "
                             "run with --device cpu, or a profile for this machine (--profile cpu)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} needs Apple's MPS, which this machine lacks; run with --device cpu")


def default_recipe_name() -> str:
    """``MINIGPT_PROFILE`` if set, else ``ci`` under CI, else ``gpu`` with CUDA, else ``cpu``."""
    name = os.environ.get("MINIGPT_PROFILE", "").strip().lower()
    if name:
        return name
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return "ci"
    return "gpu" if torch.cuda.is_available() else "cpu"


def recipe(name: str | None = None, overrides: Mapping[str, object] | None = None, **top: object) -> Recipe:
    """The named recipe (default: :func:`default_recipe_name`) with ``overrides`` by dotted path.

    >>> recipe("ci", {"sft.steps": 300}, seed=1).sft.steps
    300
    """
    name = (name or default_recipe_name()).lower()
    if name not in RECIPES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(RECIPES)} "
                         "(set MINIGPT_PROFILE or pass the name)")
    return override(RECIPES[name], {**(overrides or {}), **top})


def override(base: Any, changes: Mapping[str, object], prefix: str = "") -> Any:
    """``base`` (a frozen dataclass tree) with each ``"a.b.c": value`` of ``changes`` replaced,
    all at once (so two settings that must agree can change together); a string value is parsed
    to the field's type, as the command line gives it."""
    fields = {f.name: f for f in dataclasses.fields(base)}
    direct: dict[str, object] = {}
    nested: dict[str, dict[str, object]] = {}
    for path, value in changes.items():
        key, _, rest = path.partition(".")
        full = prefix + path
        if key not in fields:
            raise ValueError(f"unknown setting {full!r}: {type(base).__name__} has no field {key!r}; "
                             f"it has {', '.join(fields)} (`minigpt recipe` prints them all)")
        current = getattr(base, key)
        if rest:
            if not dataclasses.is_dataclass(current):
                raise ValueError(f"unknown setting {full!r}: {prefix}{key} is a value, not a section")
            nested.setdefault(key, {})[rest] = value
        elif dataclasses.is_dataclass(current):
            raise ValueError(f"{full!r} is a section; set one of its fields, such as "
                             f"{full}.{dataclasses.fields(current)[0].name}")
        else:
            hint = typing.get_type_hints(type(base))[key]
            direct[key] = parse_value(value, hint, full) if isinstance(value, str) else value
    for key, sub in nested.items():
        direct[key] = override(getattr(base, key), sub, f"{prefix}{key}.")
    return dataclasses.replace(base, **direct)


def parse_value(text: str, hint: Any, path: str) -> object:
    """``text`` as a value of type ``hint`` (int, float, str, bool, an optional of one of them,
    or a tuple: comma-separated, or as ``minigpt recipe`` prints one, ``(120,)`` or ``('ln_1', 'ln_2')``),
    with an error naming ``path`` when it does not parse."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and text.lower() == "none":
        return None
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = (t.strip() for t in text.strip().removeprefix("(").removesuffix(")").split(","))
        return tuple(parse_value(t.strip("'\""), args[0], path) for t in items if t)
    if origin is typing.Literal:
        if text not in typing.get_args(hint):
            raise ValueError(f"{path}={text!r} must be one of {', '.join(map(repr, typing.get_args(hint)))}")
        return text
    kind = args[0] if args else hint
    try:
        if kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        return kind(text)
    except KeyError:
        raise ValueError(f"{path}={text!r} is not a bool: give true or false") from None
    except ValueError:
        raise ValueError(f"{path}={text!r} is not a valid {getattr(kind, '__name__', kind)}") from None


def flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every leaf of a recipe (or a part of one) as ``(dotted path, value)``, in field order."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from flatten(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value
