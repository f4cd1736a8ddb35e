"""The ``minigpt`` command line: each chapter's step as a command, with the same names.

Every command reads the recipe named by ``--profile`` and takes any of its fields by dotted path
(``--sft.steps 800``, ``--rlhf.ppo.kl_coef=0.2``); ``--train.FIELD`` sets a field of the stage's
:class:`~minigpt.train.TrainConfig` that the recipe does not hold (``--train.sample_interval 0``).
A mistake is reported in one line (``--debug`` shows its traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minigpt.errors import MinigptError, Stopped
from minigpt.recipe import Recipe, check_device, flatten, override, parse_value, recipe

#: The recipe's own fields, given as --seed 2 (every other field has a dot: --sft.steps 800).
TOP_LEVEL = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "name" and f.type in ("str", "bool", "int"))


def split_overrides(argv: Sequence[str], top: Sequence[str] = TOP_LEVEL) -> tuple[list[str], dict[str, str]]:
    """``argv`` without its recipe options (``--a.b VALUE`` or ``--a.b=VALUE``, and ``--seed``,
    ``--device`` ... of ``top``), and those options as ``{"a.b": "VALUE"}``."""
    rest, found = [], {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if not (arg.startswith("--") and ("." in name or name in top)):
            rest.append(arg)
            continue
        if "=" in arg:
            found[name] = arg.split("=", 1)[1]
        elif args:
            found[name] = args.pop(0)
        else:
            raise ValueError(f"--{name} needs a value, such as --{name}=VALUE")
    return rest, found


def _recipe_and_train(args: argparse.Namespace) -> tuple[Recipe, dict[str, Any]]:
    """The recipe in force (``--profile`` and the dotted overrides) and the ``--train.*`` fields."""
    from minigpt.train import TrainConfig

    given = dict(args.overrides)
    train = {k.split(".", 1)[1]: v for k, v in given.items() if k.startswith("train.")}
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(train) - set(hints))
    if unknown:
        raise ValueError(f"unknown --train.{unknown[0]}; TrainConfig's fields are {', '.join(hints)}")
    parsed = {k: parse_value(v, hints[k], f"train.{k}") for k, v in train.items()}
    return recipe(args.profile, {k: v for k, v in given.items() if not k.startswith("train.")}), parsed


def _prepare_out(path: str, *, folder: bool, example: str = "my.tok") -> None:
    """Make ``--out``'s folder (``path`` itself, or the folder of the file ``path``) and check it is
    writable, so that a mistake stops the command now rather than after minutes of work."""
    out = Path(path)
    if out.exists() and out.is_dir() != folder:
        raise ValueError(f"--out {path} is a {'file' if folder else 'folder'}; give "
                         f"{'a folder (made if missing)' if folder else 'a file name, such as ' + str(out / example)}")
    where = out if folder else out.parent
    where.mkdir(parents=True, exist_ok=True)
    if not os.access(where, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(where))


def _recipe_to_run(args: argparse.Namespace, out: str) -> tuple[Recipe, dict[str, Any]]:
    """:func:`_recipe_and_train` for a command that trains into ``out``, whose device and output
    folder are checked first."""
    r, train = _recipe_and_train(args)
    check_device(r.device)
    _prepare_out(out, folder=True)
    return r, train


def _print_recipe(r: Recipe, parts: Sequence[str], train: dict[str, Any] | None = None) -> None:
    """The settings a command runs with: the recipe's top-level fields and the ``parts`` it reads."""
    if os.environ.get("RANK", "0") != "0":
        return
    top = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if not dataclasses.is_dataclass(getattr(r, f.name))}
    rows = [*top.items(), *(row for part in parts for row in flatten(getattr(r, part), f"{part}."))]
    rows += [(f"train.{k}", v) for k, v in (train or {}).items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:>{width}} = {value}")


def _cmd_recipe(args: argparse.Namespace) -> None:
    r, _ = _recipe_and_train(args)
    _print_recipe(r, [f.name for f in dataclasses.fields(r) if dataclasses.is_dataclass(getattr(r, f.name))])


def _cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from minigpt.data import shakespeare_text
    from minigpt.tokenizer import train_bpe

    r, _ = _recipe_and_train(args)
    _prepare_out(args.out, folder=False)
    if args.input:
        try:
            with open(args.input, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as err:
            raise ValueError(f"--input {args.input} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not text:
            raise ValueError(f"--input {args.input} is empty: give a text file to learn the merges from")
    else:
        text = shakespeare_text(r.tokenizer.corpus_chars)
    vocab_size = r.tokenizer.vocab_size
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


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from minigpt.pretrain import pretrain

    r, train_overrides = _recipe_to_run(args, args.out)
    _print_recipe(r, ["tokenizer", "model", "optim", "pretrain"], train_overrides)
    trainer = pretrain(r, args.out, resume=not args.restart, **train_overrides)
    if trainer.ddp.is_main:
        last = trainer.history[-1] if trainer.history else {}
        print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)))
        c = trainer.clock
        if c["wall_seconds"]:
            share = {k: f"{c[f'{k}_seconds'] / c['wall_seconds']:.1%}" for k in ("train", "eval", "sample", "checkpoint")}
            print(f"wall clock: {c['tokens'] / c['wall_seconds']:,.0f} tokens/s over {c['wall_seconds']:.1f} s (training "
                  f"steps {share['train']}, evaluation {share['eval']}, samples {share['sample']}, checkpoints "
                  f"{share['checkpoint']}); the training steps alone: {c['tokens'] / c['train_seconds']:,.0f} tokens/s")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from minigpt.pretrain import prepare_data
    from minigpt.shards import read_shard

    if args.workers < 0:
        raise ValueError(f"--workers {args.workers} must be at least 1 (or 0 for one per core)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("prepare runs as one process and starts its own workers; run it without torchrun")
    r, _ = _recipe_and_train(args)
    _prepare_out(args.out, folder=True)
    _print_recipe(r, ["tokenizer", "pretrain"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = args.workers or cores
    start = time.perf_counter()
    tok, prepared = prepare_data(r, args.out, workers=workers)
    tokens = {split: sum(len(read_shard(p)) for p in paths) for split, paths in
              (("train", prepared.train), ("val", prepared.val))}
    print(f"{args.out}: {tokens['train']:,} training and {tokens['val']:,} validation tokens in "
          f"{len(prepared.train) + len(prepared.val)} shard(s), vocabulary {tok.vocab_size:,}, "
          f"{prepared.bytes_per_token:.2f} bytes per token ({time.perf_counter() - start:,.0f} s with {workers} "
          f"worker(s)); train with `minigpt pretrain --profile {r.name} --out {args.out}` (torchrun too)")


#: ``--lang``'s short codes, as the corpus names its languages (any other name of the corpus works as is).
LANGUAGE_CODES = {"en": "english", "zh": "chinese"}


def _cmd_sft(args: argparse.Namespace) -> None:
    from minigpt.sft import sft

    if args.lang:  # --lang zh is --chat --chat.language chinese
        language = LANGUAGE_CODES.get(args.lang.lower(), args.lang.lower())
        if args.overrides.get("chat.language", language) != language:
            raise ValueError(f"--lang {args.lang} and --chat.language {args.overrides['chat.language']} disagree; "
                             "give one of them")
        args.chat, args.overrides = True, {**args.overrides, "chat.language": language}
    r, train_overrides = _recipe_to_run(args, args.out)
    if args.chat:
        from minigpt.chatbot import train_chat
        from minigpt.data import chatterbot_files

        if train_overrides or args.lora or args.base or args.task != "arithmetic":
            raise ValueError("--chat trains the recipe's chat model from its pretrained run: set its fields as "
                             "--chat.FIELD (such as --chat.steps 500 or --chat.language chinese), not --train.*, "
                             "--lora, --base or --task")
        chatterbot_files(r.chat.language)  # an unknown language fails now, not after pretraining
        _print_recipe(r, ["model", "optim", "chat"])
        run = train_chat(r, args.out, resume=not args.restart)
        if run.trainer.ddp.is_main:
            print(f"chat with it: minigpt chat {args.out}")
        return
    _print_recipe(r, ["model", "optim", "sft", *(["lora"] if args.lora else [])], train_overrides)
    run = sft(r, args.base, args.out, task=args.task, lora=args.lora or None, resume=not args.restart,
              **train_overrides)
    if run.trainer.ddp.is_main:
        print(f"chat with it: minigpt chat {args.out}")


def _cmd_rlhf(args: argparse.Namespace) -> None:
    from minigpt.rlhf import run

    out = args.out or f"runs/rlhf/{args.stage}"
    r, train_overrides = _recipe_to_run(args, out)
    if train_overrides:
        raise ValueError("the RL stages do not use the Trainer: set their fields as --rlhf.STAGE.FIELD, "
                         "such as --rlhf.ppo.steps 20 (`minigpt recipe` lists them)")
    for flag, owner in (("plain", "dpo"), ("rloo", "grpo")):
        if getattr(args, flag) and args.stage != owner:
            raise ValueError(f"--{flag} is a setting of the {owner} stage, not of {args.stage}")
    # As settings, so that the settings printed (and recorded in run.json) are those that run.
    r = override(r, {"rlhf.dpo.rpo_alpha": None} if args.plain else {"rlhf.grpo.advantage": "rloo"} if args.rloo else {})
    _print_recipe(r, ["sft", "rlhf"])
    if args.stage == "reward":
        stage = run.run_reward(r, out)
    elif args.stage == "ppo":
        stage = run.run_ppo(r, out, args.reward)
    elif args.stage == "dpo":
        stage = run.run_dpo(r, out)
    else:
        stage = run.run_grpo(r, out)
    for key, value in stage.summary.items():
        print(f"{key:>20} = {value:.4g}" if isinstance(value, float) else f"{key:>20} = {value}")
    if args.stage != "reward":
        print(f"chat with it: minigpt chat {out}")


def _cmd_eval_hellaswag(args: argparse.Namespace) -> None:
    import json

    import torch

    from minigpt.hellaswag import GPT2_NAMES, load_items, score_items
    from minigpt.train import autocast_dtype

    gpt2 = args.run in GPT2_NAMES and not Path(args.run).exists()
    if not gpt2:
        from minigpt.runs import read_run

        if not Path(args.run).is_dir():
            raise ValueError(f"{args.run} is neither a run folder nor a GPT-2 name ({', '.join(GPT2_NAMES)})")
        read_run(args.run)  # not a run folder: say so before any download
    for flag in ("limit", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    if args.out:
        _prepare_out(args.out, folder=False, example="result.json")
    items = load_items(data_files=args.data_files, limit=args.limit)  # offline: fails here, in seconds
    if gpt2:
        from minigpt.model import GPT
        from minigpt.tokenizer import get_encoding

        model, encode = GPT.from_pretrained(args.run).to(device), get_encoding("gpt2").encode
    else:
        from minigpt.runs import load_run

        model, tokenizer = load_run(args.run, device=device)
        encode = tokenizer.encode
    start = time.perf_counter()
    result = score_items(model, encode, items, batch_size=args.batch_size, dtype=autocast_dtype(args.dtype, device))
    print(f"hellaswag acc_norm {result['acc_norm']:.4f} acc {result['acc']:.4f} on {result['n']} items ({args.run})")
    if args.out:
        record = {"task": "hellaswag", "run": args.run, **result, "data_files": args.data_files, "limit": args.limit,
                  "device": device, "dtype": args.dtype, "seconds": round(time.perf_counter() - start, 1)}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


_CHAT_HELP = """commands: /reset forgets the conversation, /temp T sets the temperature (0 = greedy),
/help shows this, /quit (or Ctrl-D) leaves; Ctrl-C stops an answer"""


def _cmd_chat(args: argparse.Namespace) -> None:
    from minigpt.chat import ChatSession
    from minigpt.runs import find_or_make, load_run, read_run

    if args.run is None:  # the book's chat model: chapter 5's, trained on first use
        r, _ = _recipe_and_train(args)
        args.run = str(find_or_make(r, "chat", progress=True))
    stage = read_run(args.run).stage
    if stage == "pretrain":
        raise ValueError(f"{args.run} is a pretraining run: it continues text and has never seen the chat format; "
                         f"fine-tune it first (minigpt sft --base {args.run} --out runs/sft), then chat with that")
    if stage == "reward":
        raise ValueError(f"{args.run} is a reward model: it scores answers and does not write them; chat with a "
                         "policy instead (runs/rlhf/ppo, dpo or grpo)")
    model, tok = load_run(args.run)
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
            print(f"({chat.forgetting_note()})")


_PROFILE_HELP = "ci, cpu, gpu or full (default: $MINIGPT_PROFILE, else ci under CI, gpu with CUDA, cpu)"
_OVERRIDE_HELP = "`minigpt recipe --profile NAME` lists every field; --train.FIELD sets the Trainer's others"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigpt", description=__doc__)
    # Read by main() wherever it stands on the command line; declared here for --help.
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also MINIGPT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("recipe", help="print every setting of a recipe (with any --SECTION.FIELD overrides)")
    p.add_argument("--profile", help=_PROFILE_HELP)
    p.set_defaults(func=_cmd_recipe)

    tok = sub.add_parser("tokenizer", help="train or try a BPE tokenizer").add_subparsers(
        dest="tokenizer_command", required=True)
    t = tok.add_parser("train", help="train byte-level BPE (default corpus: Shakespeare)")
    t.add_argument("--profile", help=_PROFILE_HELP + "; --tokenizer.corpus_chars and --tokenizer.vocab_size "
                                     "(256 bytes + merges + special tokens) override it")
    t.add_argument("--input", help="a UTF-8 text file to train on instead of Shakespeare")
    t.add_argument("--special", action="append", default=[], metavar="TOKEN",
                   help="a special token such as <|endoftext|> (repeatable)")
    t.add_argument("--out", required=True, help="where to save the tokenizer")
    t.set_defaults(func=_cmd_tokenizer_train)
    e = tok.add_parser("encode", help="show how a saved tokenizer splits a text")
    e.add_argument("tokenizer", help="a file written by `minigpt tokenizer train`")
    e.add_argument("text")
    e.set_defaults(func=_cmd_tokenizer_encode)

    t = sub.add_parser("prepare", help="tokenize the recipe's corpus into token shards, on every core",
                       description="The step before pretraining: trains the recipe's tokenizer (or takes GPT-2's) "
                                   "and writes the corpus as token shards into --out, with a process per core. "
                                   "Resumable: a killed run continues from its last shard. Needed before "
                                   "pretraining under torchrun, which never tokenizes; a single-process "
                                   "`minigpt pretrain` calls it itself (with one worker).")
    t.add_argument("--profile", help=_PROFILE_HELP)
    t.add_argument("--out", default="runs/pretrain", help="the folder `minigpt pretrain --out` will train in")
    t.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: one per core)")
    t.set_defaults(func=_cmd_prepare)

    t = sub.add_parser("pretrain", help="pretrain a GPT on the recipe's corpus (works under torchrun)",
                       description="Runs with the recipe's tokenizer, model, optim and pretrain sections; "
                                   "override any field as --pretrain.steps 4000 (" + _OVERRIDE_HELP + ").")
    t.add_argument("--profile", help=_PROFILE_HELP)
    t.add_argument("--out", default="runs/pretrain", help="folder for checkpoints, metrics and shards")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    t.set_defaults(func=_cmd_pretrain)

    from minigpt.sft import TASK_CHOICES

    t = sub.add_parser("sft", help="fine-tune a pretrained GPT to answer in the chat format",
                       description="Supervised fine-tuning on offline tasks with checkable answers; prints "
                                   "held-out exact match. Runs with the recipe's sft (and lora) sections; override "
                                   "any field as --sft.steps 800 (" + _OVERRIDE_HELP + ").")
    t.add_argument("--profile", help=_PROFILE_HELP)
    t.add_argument("--out", default="runs/sft", help="folder for checkpoints, metrics and the chat tokenizer")
    t.add_argument("--base", help="'pretrained' (the recipe's cached model, trained on first use), 'fresh' "
                                  "(random weights) or a `minigpt pretrain` folder; default: the recipe's sft.base")
    t.add_argument("--task", default="arithmetic", choices=TASK_CHOICES, help="what to learn (default: arithmetic)")
    t.add_argument("--lora", action="store_true", help="train LoRA adapters only (the recipe's lora section)")
    t.add_argument("--chat", action="store_true",
                   help="train the chat model instead: human dialogue with arithmetic mixed in, from the pretrained "
                        "run (the recipe's chat section; --chat.language chinese for the Chinese conversations)")
    t.add_argument("--lang", metavar="LANGUAGE",
                   help="train the chat model (implies --chat) on the conversations of LANGUAGE: zh or chinese, "
                        "en or english, or any other language of chatterbot-corpus (the same as --chat.language)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    t.set_defaults(func=_cmd_sft)

    r = sub.add_parser("rlhf", help="reward model, PPO, DPO or GRPO on top of an SFT model",
                       description="Each stage starts from the recipe's SFT run at rlhf.start_step (trained and "
                                   "cached on first use) and prints its before/after numbers; override any field "
                                   "as --rlhf.ppo.steps 20 (`minigpt recipe --profile NAME` lists them).")
    r.add_argument("stage", choices=("reward", "ppo", "dpo", "grpo"),
                   help="reward: train the reward model; ppo: optimise against it; dpo: learn from pairs "
                        "directly; grpo: learn from a verifiable reward")
    r.add_argument("--profile", help=_PROFILE_HELP)
    r.add_argument("--out", help="output folder (default runs/rlhf/STAGE)")
    r.add_argument("--reward", default="runs/rlhf/reward/reward_model.safetensors",
                   help="ppo: the reward model `minigpt rlhf reward` wrote")
    r.add_argument("--plain", action="store_true", help="dpo: without RPO's NLL term (to see the pitfall)")
    r.add_argument("--rloo", action="store_true", help="grpo: RLOO's leave-one-out baseline instead")
    r.set_defaults(func=_cmd_rlhf)

    c = sub.add_parser("chat", help="talk to a fine-tuned model in the terminal",
                       description=_CHAT_HELP.replace("\n", " "))
    c.add_argument("run", nargs="?", help="the --out folder of `minigpt sft` or `minigpt rlhf`; default: the "
                                          "recipe's chat model (chapter 5's; trained and cached on first use)")
    c.add_argument("--profile", help=_PROFILE_HELP + "; the recipe of the default chat model")
    c.add_argument("--system", help="a system message to start every conversation with")
    c.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    c.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    c.add_argument("--max-new-tokens", type=int,
                   help="longest answer in tokens (default: half the model's context, at most 128)")
    c.add_argument("--seed", type=int, help="for answers that repeat from run to run")
    c.set_defaults(func=_cmd_chat)

    from minigpt.hellaswag import GPT2_NAMES
    from minigpt.train import DTYPES

    ev = sub.add_parser("eval", help="score a model on a benchmark (hellaswag)").add_subparsers(
        dest="eval_command", required=True)
    h = ev.add_parser("hellaswag", help="HellaSwag's 10,042 validation items: acc_norm and acc",
                      description="Picks each item's ending with the lowest mean loss per token (acc_norm; "
                                  "GPT-2 124M: about 0.295, chance: 0.25) and with the lowest summed loss (acc). "
                                  "The items come from the Hugging Face Hub through datasets, or from --data-files.")
    h.add_argument("run", help="a run folder (of `minigpt pretrain`, `sft`, ...) or a GPT-2 name from the Hub: "
                               + ", ".join(GPT2_NAMES))
    h.add_argument("--limit", type=int, help="score only the first N items")
    h.add_argument("--data-files", action="append", metavar="PATH",
                   help="local JSON/JSONL rows in the Hub's schema (ctx, endings, label) instead of the Hub "
                        "(repeatable)")
    h.add_argument("--device", help="where to run the model (default: cuda if there is one, else cpu)")
    h.add_argument("--batch-size", type=int, default=16, help="items per forward pass, 4 rows each (default 16)")
    h.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="autocast dtype of the matmuls (default float32; auto: bf16 on a recent GPU)")
    h.add_argument("--out", metavar="FILE.json", help="also write the result there as JSON")
    h.set_defaults(func=_cmd_eval_hellaswag)
    return parser


#: What a user can fix: the message is the whole report (see :mod:`minigpt.errors`); anything else is
#: a bug, and keeps its traceback.
USER_ERRORS = (MinigptError, ValueError, OSError, ImportError)

_WRITABLE = "choose a folder you can write: another --out, or MINIGPT_CACHE for minigpt's cache"
#: What to do about an error the operating system raised, by its errno.
_OS_HINTS = {
    errno.ENOSPC: "free some space, or point --out (and MINIGPT_CACHE, minigpt's cache) at another disk, "
                  "then run the command again",
    errno.EACCES: _WRITABLE,
    errno.EPERM: _WRITABLE,
    errno.EROFS: _WRITABLE,
    errno.EEXIST: "a file stands where minigpt makes a folder: move it, or choose another path",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "it is a folder; give a file name",
}
#: The pip requirement that brings a module minigpt imports only when a feature needs it.
_EXTRAS = {"datasets": "minigpt[data]", "sklearn": "minigpt[vision]"}


def _describe(err: BaseException) -> str:
    """``err`` as one line: an OS error with its path and what to do, a missing module with how to
    install it, anything else by its own message."""
    if isinstance(err, OSError) and err.strerror:  # from the OS; minigpt's own OSErrors carry a message
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
        if err.errno in _OS_HINTS:
            text += f"; {_OS_HINTS[err.errno]}"
    elif isinstance(err, ModuleNotFoundError) and err.name and "pip install" not in str(err):
        root = err.name.split(".")[0]
        text = f"{err}; install it: pip install '{_EXTRAS.get(root, root)}'"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _run(argv: list[str]) -> None:
    rest, overrides = split_overrides(argv, top=() if argv[:1] in (["chat"], ["eval"]) else TOP_LEVEL)
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    if overrides and args.func in (_cmd_chat, _cmd_tokenizer_encode, _cmd_eval_hellaswag):
        raise ValueError(f"{args.command} takes no recipe settings (got --{next(iter(overrides))})")
    try:
        args.func(args)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Leave the ``torchrun`` job's process group, if a command joined one: a process that exits
    without it leaves NCCL's resources to the operating system, and torch warns about it."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status: 0 done, 2 a mistake the user can fix (one line on
    stderr that says what to do), 130 Ctrl-C. ``--debug`` anywhere on the command line (or
    ``MINIGPT_DEBUG=1``) lets the exception through instead, with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MINIGPT_DEBUG", "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        _run(argv)
    except BrokenPipeError:  # `minigpt recipe | head`: the reader has gone, which is no error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit does not fail again
        os.close(devnull)
        return 1
    except Stopped as err:
        if debug:
            raise
        print(f"minigpt: {err}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        if debug:
            raise
        again = ""
        if argv[:1] in (["pretrain"], ["sft"]):
            again = (" (run it again without --restart to resume from the last checkpoint)" if "--restart" in argv
                     else " (run the same command again to resume from the last checkpoint)")
        print(f"\nminigpt: interrupted{again}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"minigpt: error: {_describe(err)}", file=sys.stderr)
        return 2
    return 0
