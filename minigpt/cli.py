"""The ``minigpt`` command line: each chapter's step as a command, with the same names."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

from minigpt.profiles import profile


def _cmd_profile(args: argparse.Namespace) -> None:
    for field, value in dataclasses.asdict(profile(args.profile)).items():
        print(f"{field:>14} = {value}")


def _cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from minigpt.data import shakespeare_text
    from minigpt.tokenizer import train_bpe

    p = profile(args.profile)
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            text = f.read()
    else:
        text = shakespeare_text(args.max_chars or p.corpus_chars)
    vocab_size = args.vocab_size or p.vocab_size
    start = time.perf_counter()
    tok = train_bpe(text, vocab_size, special_tokens=args.special, progress=True)
    elapsed = time.perf_counter() - start
    tok.save(args.out)
    ids = tok.encode(text, allowed_special="all")
    print(f"trained vocab {tok.vocab_size} on {len(text):,} chars in {elapsed:.1f} s; "
          f"{len(text.encode('utf-8')) / len(ids):.2f} bytes/token; saved to {args.out}")


def _cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    from minigpt.tokenizer import BPETokenizer

    tok = BPETokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)
    print(" ".join(map(str, ids)))
    print(" | ".join(tok.decode([i]) for i in ids))


_TYPES = {"int": int, "float": float, "str": str,
          "bool": lambda v: {"true": True, "1": True, "false": False, "0": False}[v.lower()]}


def _setting_fields() -> tuple[list[dataclasses.Field], list[dataclasses.Field]]:
    """Profile fields, then TrainConfig fields the profile does not already set."""
    from minigpt.profiles import Profile
    from minigpt.train import TrainConfig

    prof = [f for f in dataclasses.fields(Profile) if f.name != "name"]
    names = {f.name for f in prof}
    return prof, [f for f in dataclasses.fields(TrainConfig) if f.name not in names]


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from minigpt.pretrain import pretrain, settings, train_config

    prof_fields, train_fields = _setting_fields()
    given = {k: v for k, v in vars(args).items() if v is not None}
    p = profile(args.profile, **{f.name: given[f.name] for f in prof_fields if f.name in given})
    train_overrides = {f.name: given[f.name] for f in train_fields if f.name in given}
    if os.environ.get("RANK", "0") == "0":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        for key, value in settings(p, train_config(p, world, **train_overrides)).items():
            print(f"{key:>20} = {value}")
    trainer = pretrain(p, args.out, resume=not args.restart, **train_overrides)
    if trainer.ddp.is_main:
        last = trainer.history[-1] if trainer.history else {}
        print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)))


def _cmd_sft(args: argparse.Namespace) -> None:
    from minigpt.sft import sft

    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("learning_rate", args.learning_rate))
                 if v is not None}
    run = sft(profile(args.profile), args.base, args.out, task=args.task, lora=args.lora or None,
              resume=not args.restart, **overrides)
    if run.trainer.ddp.is_main:
        print(f"chat with it: minigpt chat {args.out}")


def _cmd_rlhf(args: argparse.Namespace) -> None:
    from minigpt.rlhf import run

    prof = profile(args.profile)
    out = args.out or f"runs/rlhf/{args.stage}"
    overrides = {k: v for k, v in (("steps", args.steps), ("learning_rate", args.learning_rate)) if v is not None}
    if args.stage == "reward":
        if overrides:
            raise ValueError("--steps and --learning-rate apply to ppo, dpo and grpo; the reward model's are in "
                             "minigpt.rlhf.run.RLHF_SETTINGS")
        stage = run.run_reward(prof, out)
    elif args.stage == "ppo":
        stage = run.run_ppo(prof, out, args.reward, **overrides)
    elif args.stage == "dpo":
        stage = run.run_dpo(prof, out, **({"rpo_alpha": None} if args.plain else {}), **overrides)
    else:
        stage = run.run_grpo(prof, out, **({"advantage": "rloo"} if args.rloo else {}), **overrides)
    for key, value in stage.summary.items():
        print(f"{key:>20} = {value:.4g}" if isinstance(value, float) else f"{key:>20} = {value}")
    if args.stage != "reward":
        print(f"chat with it: minigpt chat {out}")


_CHAT_HELP = """commands: /reset forgets the conversation, /temp T sets the temperature (0 = greedy),
/help shows this, /quit (or Ctrl-D) leaves; Ctrl-C stops an answer"""


def _cmd_chat(args: argparse.Namespace) -> None:
    from minigpt.chat import ChatSession
    from minigpt.sft import load_sft

    model, tok = load_sft(args.run)
    chat = ChatSession(model, tok, system=args.system, temperature=args.temperature, top_p=args.top_p,
                       max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(f"chatting with {args.run} ({model.num_params(non_embedding=False) / 1e6:.2f}M parameters); {_CHAT_HELP}")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line.startswith("/"):
            command, _, value = line.partition(" ")
            if command == "/quit":
                return
            if command == "/reset":
                chat.reset()
                print("(conversation forgotten)")
            elif command == "/temp":
                try:
                    temperature = float(value)
                except ValueError:
                    temperature = -1.0
                if temperature >= 0:
                    chat.temperature = temperature
                    print(f"(temperature {temperature:g})")
                else:
                    print(f"(/temp needs a number >= 0, such as /temp 0.7; it is {chat.temperature:g})")
            else:
                print(f"({_CHAT_HELP})")
            continue
        dropped = chat.dropped_turns
        print("assistant> ", end="", flush=True)
        try:
            for piece in chat.reply(line):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except ValueError as err:
            print(f"({err})", end="")
        print()
        if chat.dropped_turns > dropped:
            print(f"(the chat outgrew the model's context: its {chat.dropped_turns} oldest exchange(s) are forgotten)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="print the sizes of a profile")
    p.add_argument("--profile", help="ci, cpu, gpu or full (default: see minigpt.profile)")
    p.set_defaults(func=_cmd_profile)

    tok = sub.add_parser("tokenizer", help="train or try a BPE tokenizer").add_subparsers(
        dest="tokenizer_command", required=True)
    t = tok.add_parser("train", help="train byte-level BPE (default corpus: Shakespeare)")
    t.add_argument("--profile", help="sizes to default to (corpus_chars, vocab_size)")
    t.add_argument("--input", help="a UTF-8 text file to train on instead of Shakespeare")
    t.add_argument("--max-chars", type=int, help="characters of Shakespeare to use")
    t.add_argument("--vocab-size", type=int, help="256 bytes + merges + special tokens")
    t.add_argument("--special", action="append", default=[], metavar="TOKEN",
                   help="a special token such as <|endoftext|> (repeatable)")
    t.add_argument("--out", required=True, help="where to save the tokenizer")
    t.set_defaults(func=_cmd_tokenizer_train)
    e = tok.add_parser("encode", help="show how a saved tokenizer splits a text")
    e.add_argument("tokenizer", help="a file written by `minigpt tokenizer train`")
    e.add_argument("text")
    e.set_defaults(func=_cmd_tokenizer_encode)

    t = sub.add_parser("pretrain", help="pretrain a GPT on the profile's corpus (works under torchrun)",
                       description="Every setting below defaults to the profile's value.")
    t.add_argument("--profile", help="ci, cpu, gpu or full (default: see minigpt.profile)")
    t.add_argument("--out", default="runs/pretrain", help="folder for checkpoints, metrics and shards")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    for field in sum(_setting_fields(), []):
        flags = dict.fromkeys((f"--{field.name.replace('_', '-')}", f"--{field.name}"))  # both spellings
        t.add_argument(*flags, dest=field.name, type=_TYPES[str(field.type)], metavar=str(field.type).upper())
    t.set_defaults(func=_cmd_pretrain)

    from minigpt.sft import TASK_CHOICES

    t = sub.add_parser("sft", help="fine-tune a pretrained GPT to answer in the chat format",
                       description="Supervised fine-tuning on offline tasks with checkable answers; prints "
                                   "held-out exact match. Settings default to the profile's (minigpt.sft.SFT_SETTINGS).")
    t.add_argument("--profile", help="ci, cpu, gpu or full (default: see minigpt.profile)")
    t.add_argument("--out", default="runs/sft", help="folder for checkpoints, metrics and the chat tokenizer")
    t.add_argument("--base", help="'pretrained' (the profile's cached model, trained on first use), 'fresh' "
                                  "(random weights) or a `minigpt pretrain` folder; default: the profile's choice")
    t.add_argument("--task", default="arithmetic", choices=TASK_CHOICES, help="what to learn (default: arithmetic)")
    t.add_argument("--lora", action="store_true", help="train LoRA adapters only (minigpt.sft.lora_settings)")
    t.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, help="optimizer steps")
    t.add_argument("--learning-rate", "--learning_rate", dest="learning_rate", type=float, help="peak learning rate")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    t.set_defaults(func=_cmd_sft)

    r = sub.add_parser("rlhf", help="reward model, PPO, DPO or GRPO on top of an SFT model",
                       description="Each stage starts from the profile's early-stopped SFT model (trained and "
                                   "cached on first use) and prints its before/after numbers; settings in "
                                   "minigpt.rlhf.run.RLHF_SETTINGS.")
    r.add_argument("stage", choices=("reward", "ppo", "dpo", "grpo"),
                   help="reward: train the reward model; ppo: optimise against it; dpo: learn from pairs "
                        "directly; grpo: learn from a verifiable reward")
    r.add_argument("--profile", help="ci, cpu, gpu or full (default: see minigpt.profile)")
    r.add_argument("--out", help="output folder (default runs/rlhf/STAGE)")
    r.add_argument("--reward", default="runs/rlhf/reward/reward_model.safetensors",
                   help="ppo: the reward model `minigpt rlhf reward` wrote")
    r.add_argument("--plain", action="store_true", help="dpo: without RPO's NLL term (to see the pitfall)")
    r.add_argument("--rloo", action="store_true", help="grpo: RLOO's leave-one-out baseline instead")
    r.add_argument("--steps", type=int, help="iterations (ppo, dpo, grpo)")
    r.add_argument("--learning-rate", "--learning_rate", dest="learning_rate", type=float, help="learning rate")
    r.set_defaults(func=_cmd_rlhf)

    c = sub.add_parser("chat", help="talk to a fine-tuned model in the terminal",
                       description=_CHAT_HELP.replace("\n", " "))
    c.add_argument("run", help="the --out folder of `minigpt sft`")
    c.add_argument("--system", help="a system message to start every conversation with")
    c.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    c.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    c.add_argument("--max-new-tokens", type=int,
                   help="longest answer in tokens (default: half the model's context, at most 128)")
    c.add_argument("--seed", type=int, help="for answers that repeat from run to run")
    c.set_defaults(func=_cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"minigpt: error: {err}", file=sys.stderr)
        return 2
    return 0
