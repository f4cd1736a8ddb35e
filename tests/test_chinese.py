"""Chinese chat: a Chinese conversation survives the chat format for our BPE and GPT-2's, a tiny GPT
fine-tuned on a few Chinese conversations answers with their replies through ``ChatSession`` (what
``minigpt chat`` runs), and a reply cut inside a character ends in U+FFFD instead of an error.

The conversations are chatterbot-corpus's Chinese ones, read like ``test_dialogue.py`` reads them
(into the test run's own cache, see ``conftest.py``)."""

import codecs

import pytest
import torch

import minigpt.chat
from minigpt.chat import END_OF_TURN, ChatSession, Conversation, render, with_chat_tokens
from minigpt.errors import NetworkError
from minigpt.model import GPT, GPTConfig
from minigpt.sft import sft
from minigpt.tasks import dialogues
from minigpt.tokenizer import BPETokenizer, get_encoding, train_bpe


def is_han(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


@pytest.fixture(scope="module")
def chinese() -> list[Conversation]:
    return dialogues("train", language="chinese") + dialogues("test", language="chinese")


@pytest.fixture(scope="module")
def zh_tok(chinese: list[Conversation]) -> BPETokenizer:
    """A small BPE trained on the Chinese conversations: its merges join whole characters, pieces
    of one (two of its three bytes) and a character with its neighbours."""
    text = "\n".join(m.content for c in chinese for m in c.messages)
    return with_chat_tokens(train_bpe(text, 400))


@pytest.fixture(scope="module")
def gpt2_tok() -> BPETokenizer:
    try:
        enc = get_encoding("gpt2")
    except NetworkError as e:  # offline and nothing cached
        pytest.skip(f"GPT-2 encoding unavailable: {e}")
    return with_chat_tokens(BPETokenizer.from_tiktoken(enc))


def replies(ids: list[int], mask: list[bool], end: int) -> list[list[int]]:
    """The learned ids of a rendered conversation cut at each ``<|end|>``: one list per reply."""
    out: list[list[int]] = [[]]
    for i, learn in zip(ids, mask):
        if learn:
            if i == end:
                out.append([])
            else:
                out[-1].append(i)
    return out[:-1]


def streamed(tok: BPETokenizer, ids: list[int]) -> str:
    """``ids`` decoded one token at a time, as ``ChatSession.reply`` streams them."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return "".join(decoder.decode(tok.decode_bytes([i])) for i in ids) + decoder.decode(b"", final=True)


@pytest.mark.parametrize("which", ["tok", "zh_tok", "gpt2_tok"])
def test_chinese_replies_round_trip_through_the_chat_format(which, chinese, request):
    tok = request.getfixturevalue(which)  # tok: trained on English only, so Chinese is bytes
    end = tok.special_tokens[END_OF_TURN]
    assert len(chinese) > 300
    split = 0
    for conv in chinese:
        ids, mask = render(conv, tok)
        assert tok.decode(ids) == str(conv)
        said = [m.content for m in conv.messages if m.role == "assistant"]
        got = replies(ids, mask, end)
        assert [tok.decode(r) for r in got] == said
        assert [streamed(tok, r) for r in got] == said
        split += any(b"\xef\xbf\xbd" in tok.decode(r[:k]).encode() for r in got for k in range(1, len(r)))
    assert split > 100  # many replies have tokens that end inside a character, and still round-trip


def memorable(conversations: list[Conversation], n: int) -> list[Conversation]:
    """The first ``n`` one-turn conversations with a short Chinese reply whose question has no other
    reply anywhere in the corpus (a question with two replies cannot be learned by heart)."""
    answers: dict[str, set[str]] = {}
    for c in conversations:
        answers.setdefault(c.messages[0].content, set()).add(c.answer)
    return [c for c in conversations
            if len(c.messages) == 2 and len(answers[c.messages[0].content]) == 1
            and is_han(c.answer) and 4 <= len(c.answer) <= 12][:n]


def test_a_tiny_gpt_learns_chinese_replies_and_chat_answers_with_them(ci, chinese, zh_tok, tmp_path):
    convs = memorable(chinese, 6)
    assert len(convs) == 6 and len({c.messages[0].content for c in convs}) == 6
    torch.manual_seed(ci.seed)  # MINIGPT_TEST_SEED varies it
    model = GPT(GPTConfig(block_size=64, vocab_size=zh_tok.vocab_size, n_layer=1, n_head=2, n_embd=64))
    # Learned by heart with room to spare: at seeds 1337, 1 and 2, 1 and 2 threads, the loss ends below
    # 0.002 and every reply token's logit leads the next best by more than 6 (by 2.7 after 30 steps).
    steps = 60
    run = sft(ci, model, tmp_path, tokenizer=zh_tok, train=convs, test=convs, batch_size=len(convs),
              max_steps=steps, learning_rate=1e-2, warmup_steps=5, eval_interval=steps, checkpoint_interval=steps,
              sample_interval=0, progress=False)
    assert run.exact_match == 1.0
    for conv in convs:
        chat = ChatSession(run.model, run.tokenizer, temperature=0.0, max_new_tokens=24)
        assert "".join(chat.reply(conv.messages[0].content)) == conv.answer
        assert chat.messages[-1].content == conv.answer


def test_a_reply_cut_inside_a_character_ends_in_a_replacement_character(tok, monkeypatch):
    ni, hao = tok.encode("你"), tok.encode("好")  # three byte tokens each: tok never saw Chinese
    assert len(ni) == len(hao) == 3
    end = tok.special_tokens[END_OF_TURN]
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    for said, shown in [(ni[:2] + [end], "\ufffd"),  # stops after two of a character's three bytes
                        (ni + hao[:1], "你\ufffd")]:  # runs out of max_new_tokens inside the second
        fake = lambda *args, said=said, **kw: iter(torch.tensor([i]) for i in said)  # noqa: E731
        monkeypatch.setattr(minigpt.chat, "stream", fake)
        chat = ChatSession(model, tok, temperature=0.0, max_new_tokens=8)
        assert "".join(chat.reply("你好")) == shown
        assert chat.messages[-1].content == shown
