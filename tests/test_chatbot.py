"""The chat model: replies scored the same way with and without the chat format, the end-of-turn
rate, the ``ci`` chat run learning the dialogue, ``minigpt sft --chat`` and ``minigpt chat``, and
the chat window."""

from types import SimpleNamespace

import pytest
import torch

import minigpt.chatbot
from minigpt.chat import ChatSession, Conversation, render
from minigpt.chatbot import chat_data, end_rate, plain_text, reply_loss
from minigpt.cli import main
from minigpt.model import GPT, GPTConfig
from minigpt.runs import find_or_make, load_run, read_run
from minigpt.tasks import arithmetic


def test_plain_text_scores_exactly_the_reply_tokens_of_the_chat_format(tok):
    conv = Conversation([("user", "Hello"), ("assistant", "Hi there"), ("user", "Alice?"), ("assistant", "Oslo")])
    ids, mask = plain_text(conv, tok)
    chat_ids, chat_mask = render(conv, tok)
    end = tok.special_tokens["<|end|>"]
    reply = [i for i, m in zip(chat_ids, chat_mask) if m and i != end]
    assert [i for i, m in zip(ids, mask) if m] == reply == tok.encode("Hi there") + tok.encode("Oslo")
    assert tok.decode(ids) == "User: Hello\nAssistant:\nHi there\nUser: Alice?\nAssistant:\nOslo\n"


def test_reply_loss_is_the_mean_over_reply_tokens_and_refuses_what_does_not_fit(tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=16)).eval()
    conv = Conversation.single("What is 2 + 2?", "4")
    ids, mask = render(conv, tok)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0], -1)
    end = tok.special_tokens["<|end|>"]
    by_hand = [-logp[t, ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1] and ids[t + 1] != end]
    assert reply_loss(model, tok, [conv]) == pytest.approx(float(sum(by_hand) / len(by_hand)), rel=1e-5)
    with pytest.raises(ValueError, match="more than the model's block_size"):
        reply_loss(model, tok, [Conversation.single("Alice lives in Oslo. " * 20, "yes")])
    for plain in (False, True):  # only the end of turn after an empty reply, and it is not scored
        with pytest.raises(ValueError, match="no reply token to score"):
            reply_loss(model, tok, [Conversation.single("Hello", "")], plain=plain)


def test_end_rate_counts_replies_that_end_their_turn(tok, monkeypatch):
    end = tok.special_tokens["<|end|>"]
    monkeypatch.setattr(minigpt.chatbot, "complete",
                        lambda model, prompts, n, **kw: [[5, end], [5, 6, 7], [end], [5] * n][:len(prompts)])
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    convs = arithmetic(4, seed=0)
    assert end_rate(model, tok, convs, max_new_tokens=8) == 0.5
    with pytest.raises(ValueError, match="no prompt leaves room"):
        end_rate(model, tok, convs, max_new_tokens=64)


@pytest.fixture(scope="module")
def chat_run(ci):
    return find_or_make(ci, "chat")


def test_the_chat_data_mixes_dialogue_and_arithmetic_by_the_recipes_share(ci, chat_run):
    _, tok = load_run(chat_run, device="cpu")
    train = chat_data(ci, tok, "train")
    sums = sum(c.messages[0].content.startswith("What is") and c.answer.isdigit() for c in train)
    assert sums / len(train) == pytest.approx(ci.chat.arithmetic, abs=0.02)
    assert all(len(render(c, tok)[0]) <= ci.chat.max_tokens for c in train + chat_data(ci, tok, "test"))


@pytest.mark.outcome
def test_ci_chat_model_learns_the_dialogue(ci, chat_run, outcome):
    info = read_run(chat_run)
    assert info.stage == "chat" and info.parent == read_run(find_or_make(ci, "pretrain")).key
    model, tok = load_run(chat_run, device="cpu")
    base, base_tok = load_run(find_or_make(ci, "pretrain"), device="cpu")
    test = chat_data(ci, tok, "test")
    before, after = reply_loss(base, base_tok, test, plain=True), reply_loss(model, tok, test)
    assert info.extra["reply_loss"] == pytest.approx(after, rel=1e-4)
    outcome.check("chat: held-out reply loss, pretrained minus chat model (nats per token)", before - after, ">", 0.4)  # spread 0.689 .. 0.745 (6 runs)
    outcome.check("chat: replies that end their turn", info.extra["end_rate"], ">=", 0.8)  # spread 0.953 .. 1.000 (6 runs)


def test_minigpt_sft_chat_and_its_errors(tmp_path, capsys):
    out = tmp_path / "chat"
    assert main(["sft", "--chat", "--profile", "ci", "--out", str(out), "--chat.steps", "3"]) == 0
    said = capsys.readouterr().out
    assert "chat.steps = 3" in said and "reply_loss" in said and f"minigpt chat {out}" in said
    assert read_run(out).stage == "chat"
    assert main(["sft", "--chat", "--profile", "ci", "--out", str(out), "--train.max_steps", "3"]) == 2
    assert "--chat.FIELD" in capsys.readouterr().err


def test_minigpt_sft_lang_sets_the_chat_language(tmp_path, capsys, monkeypatch):
    trained = []

    def train_chat(recipe, out_dir, **kw):  # the command's settings, without the training
        trained.append(recipe.chat.language)
        return SimpleNamespace(trainer=SimpleNamespace(ddp=SimpleNamespace(is_main=True)))

    monkeypatch.setattr(minigpt.chatbot, "train_chat", train_chat)
    sft = ["sft", "--profile", "ci", "--out", str(tmp_path / "chat")]
    assert main([*sft, "--lang", "zh"]) == 0  # --lang implies --chat
    assert "chat.language = chinese" in capsys.readouterr().out
    assert main([*sft, "--chat", "--lang", "EN"]) == 0
    assert main([*sft, "--lang", "japanese", "--chat.language", "japanese"]) == 0  # any language of the corpus
    assert trained == ["chinese", "english", "japanese"]
    assert main([*sft, "--lang", "klingon"]) == 2  # refused before any training
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no language 'klingon'; choose one of" in err and "chinese" in err
    assert main([*sft, "--lang", "zh", "--chat.language", "english"]) == 2
    assert "--lang zh and --chat.language english disagree" in capsys.readouterr().err
    assert trained == ["chinese", "english", "japanese"]


def test_chat_widget_streams_the_reply_into_the_transcript(tok, monkeypatch):
    from minigpt.viz import ChatWidget

    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=16)).eval()
    widget = ChatWidget(ChatSession(model, tok, temperature=0.0, max_new_tokens=6))
    real_reply = widget.session.reply
    monkeypatch.setattr(widget.session, "reply", lambda text: iter(["Hi", " there", "!"]))
    seen = []
    widget.observe(lambda change: seen.append(change["new"][-1]["content"]), names="transcript")
    assert widget.say("Hello") == "Hi there!"
    assert widget.transcript == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}]
    assert seen == ["", "Hi", "Hi there", "Hi there!"] and not widget.busy  # the reply grew piece by piece
    monkeypatch.setattr(widget.session, "reply", real_reply)
    widget._handle_custom_msg({"type": "say", "text": "<|end|>"}, [])  # what the text box sends
    assert widget.transcript[-1]["role"] == "note" and len(widget.transcript) == 3  # refused, and said why
    widget._handle_custom_msg({"type": "reset"}, [])
    assert widget.transcript == [] and widget.session.messages == []
    html = widget.record(["Hi", "What is 2 + 2?"])._repr_mimebundle_()[0]["text/html"]
    assert "What is 2 + 2?" in html and "static" in html


def test_minigpt_chat_with_no_folder_opens_the_chat_model(chat_run, monkeypatch, capsys):
    lines = iter(["Hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--profile", "ci", "--temperature", "0"]) == 0
    said = capsys.readouterr().out
    assert f"chatting with {chat_run} " in said and "assistant> " in said
