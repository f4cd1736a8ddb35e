"""minigpt.viz: payloads are small and decode back, the sampling explorer ships the logits the sampler
saw and reads them with next_token_probs, the HTML copy is self-contained (one module behind the
shared prelude), plots draw, bad input fails clearly. The browser tests check the JavaScript."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import traitlets  # noqa: E402

from minigpt.generate import generate, next_token_probs  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.tokenizer import BPETokenizer, CharTokenizer  # noqa: E402
from minigpt.viz import (  # noqa: E402
    AttentionView,
    SamplingExplorer,
    attention_maps,
    decode_attention,
    plot_attention,
    plot_sampling,
    token_label,
)
from minigpt.viz._common import b64decode  # noqa: E402
from minigpt.viz._widget import _script_json, read_module  # noqa: E402
from minigpt.viz.sampling import MAX_VOCAB  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog, then naps."
PROMPT32 = "the quick brown fox jumps over a"  # 32 characters


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.from_text(TEXT)


@pytest.fixture(scope="module")
def model(tok: CharTokenizer) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=48, vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_embd=32))
    with torch.no_grad():  # sharper attention and logits than a fresh init: a more telling test
        m.transformer.wte.weight.mul_(10)
        for block in m.transformer.h:
            block.attn.c_attn.weight.mul_(8)
    return m.eval()


def test_import_minigpt_does_not_load_widget_libraries() -> None:
    code = ("import sys, minigpt, minigpt.viz; "
            "bad = [m for m in ('anywidget', 'ipywidgets', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- attention -------------------------------------------------------------------------------


def test_attention_payload_is_small_and_decodes_back(model: GPT, tok: CharTokenizer) -> None:
    view = AttentionView.from_model(model, tok, PROMPT32)
    assert (view.n_layer, view.n_head, view.T) == (4, 4, 32)
    payload = json.dumps(view._data, separators=(",", ":"))
    assert len(payload.encode()) < 200_000, len(payload)
    expected = np.stack([a.numpy() for a in attention_maps(model, tok.encode(PROMPT32))])
    decoded = decode_attention(view._data)
    assert np.abs(decoded - expected).max() <= 0.5 / 65535 + 1e-7
    assert np.allclose(decoded.sum(-1), 1.0, atol=32 / 65535)
    assert np.all(np.triu(decoded, k=1) == 0)  # the causal mask: nothing above the diagonal
    # 8 bits: smaller, coarser, still within half a step.
    small = AttentionView.from_model(model, tok, PROMPT32, bits=8)
    assert np.abs(decode_attention(small._data) - expected).max() <= 0.5 / 255 + 1e-7
    assert len(json.dumps(small._data)) < len(payload)


def test_attention_maps_match_the_model(model: GPT, tok: CharTokenizer) -> None:
    ids = tok.encode("the lazy dog")
    model.train()
    maps = attention_maps(model, ids)
    assert model.training  # mode restored
    model.eval()
    _, _, atts = model(torch.tensor([ids]), return_attention=True)
    assert len(maps) == 4 and maps[0].shape == (4, len(ids), len(ids))
    for mine, ref in zip(maps, atts):
        torch.testing.assert_close(mine, ref[0].detach())


def test_attention_widget_validates_input(model: GPT, tok: CharTokenizer) -> None:
    view = AttentionView.from_model(model, tok, "the fox", layer=3, head=2)
    assert (view.layer, view.head) == (3, 2)
    with pytest.raises(traitlets.TraitError, match=r"layer=4 is out of range.*4 layers"):
        view.layer = 4
    with pytest.raises(traitlets.TraitError, match=r"head=-1 is out of range.*4 heads"):
        view.head = -1
    with pytest.raises(traitlets.TraitError, match="layer=9"):
        AttentionView.from_model(model, tok, "the fox", layer=9)
    with pytest.raises(ValueError, match="prompt is empty"):
        AttentionView.from_model(model, tok, "")
    with pytest.raises(ValueError, match=r"60 tokens.*block_size=48"):
        AttentionView.from_model(model, tok, "the dog naps. " * 4 + "then")
    with pytest.raises(ValueError, match="token labels"):
        AttentionView(attention_maps(model, [1, 2, 3]), ["a", "b"])
    with pytest.raises(ValueError, match="at most 256"):
        AttentionView([torch.rand(1, 300, 300)], ["x"] * 300)
    with pytest.raises(ValueError, match="same shape"):
        AttentionView([torch.rand(2, 3, 3), torch.rand(2, 4, 4)], list("abc"))


def test_token_labels_show_spaces_and_partial_utf8(tok: CharTokenizer) -> None:
    assert token_label(tok, tok.encode(" ")[0]) == "\u2423"
    bpe = BPETokenizer([])  # the 256 byte tokens only
    assert token_label(bpe, ord("a")) == "a"
    assert token_label(bpe, 0xE2) == "\\xe2"  # the first byte of a 3-byte character
    assert token_label(bpe, ord("\n")) == "\u21b5"


# -- sampling ----------------------------------------------------------------------------------

SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.0),
    dict(temperature=0.5, top_k=5),
    dict(temperature=1.3, top_k=1),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=2.0, top_p=0.5),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05),
    dict(temperature=1.5, top_k=40, min_p=0.2),
]


def _reference(logits: torch.Tensor, s: dict) -> torch.Tensor:
    return next_token_probs(logits[None], temperature=s["temperature"], top_k=s.get("top_k") or None,
                            top_p=s.get("top_p"), min_p=s.get("min_p"))[0]


@pytest.mark.parametrize("V", [2048, 50257])
def test_sampling_payload_ships_the_whole_row(V: int) -> None:
    logits = torch.randn(V, generator=torch.Generator().manual_seed(V)) * 3
    s = SamplingExplorer(logits, labels=[f"t{i}" for i in range(V)], n_top=20)
    (step,) = s._data["steps"]
    assert np.array_equal(b64decode(step["logits"], "<f4"), logits.numpy())  # bit for bit
    row_chars = 4 * -(-4 * V // 3)  # base64 of 4 bytes a token
    assert len(step["logits"]) == row_chars
    top = logits.topk(20).indices.tolist()
    assert sorted(map(int, s._data["labels"])) == sorted(top)  # labels only for the tokens with a bar
    payload = len(json.dumps(s._data, separators=(",", ":")))
    assert payload < row_chars + 1000, payload  # the row, 20 labels and a few settings


def test_ties_at_the_last_bar_all_get_labels() -> None:
    s = SamplingExplorer(torch.tensor([3.0, 2.0] + [1.0] * 10 + [0.0] * 20), n_top=5)
    assert sorted(map(int, s._data["labels"])) == list(range(12))  # whichever tie the page puts 5th


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_distribution_is_next_token_probs(s: dict) -> None:
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(1)) * 2.5
    w = SamplingExplorer(logits, chosen=[0, 1, 2], top_k=s.get("top_k", 0), top_p=s.get("top_p", 1.0),
                         min_p=s.get("min_p", 0.0), temperature=s["temperature"], step=2)
    torch.testing.assert_close(w.distribution(), _reference(logits[2], s))
    torch.testing.assert_close(w.distribution(0), _reference(logits[0], s))


def test_trace_replays_generate(model: GPT, tok: CharTokenizer) -> None:
    s = SamplingExplorer.trace(model, tok, "the quick", 12, seed=3, temperature=0.9, top_k=8, top_p=0.95)
    ids = torch.tensor([tok.encode("the quick")])
    out = generate(model, ids, 12, temperature=0.9, top_k=8, top_p=0.95,
                   generator=torch.Generator().manual_seed(3))
    assert s.chosen == out[0, ids.size(1):].tolist()
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (0.9, 8, 0.95, 0.0)
    full = out[0, :-1]  # the logits of step t are the model's at position len(prompt) + t - 1
    with torch.no_grad():
        logits, _ = model(full[None])
    torch.testing.assert_close(s.logits, logits[0, ids.size(1) - 1:], atol=1e-4, rtol=1e-4)
    for step in range(s.n_steps):
        s.step = step
        assert s.distribution()[s.chosen[step]] > 0  # the drawn token was in the kept set


def test_trace_with_repetition_penalty_records_penalised_logits(model: GPT, tok: CharTokenizer) -> None:
    s = SamplingExplorer.trace(model, tok, "the", 6, seed=0, temperature=0.0, repetition_penalty=1.5)
    for step in range(s.n_steps):  # greedy: the drawn token is the argmax of the recorded logits
        assert int(s.logits[step].argmax()) == s.chosen[step]
    assert s._data["trace"]["repetition_penalty"] == 1.5


def test_sampling_widget_validates_input(model: GPT, tok: CharTokenizer) -> None:
    s = SamplingExplorer.from_model(model, tok, "the quick")
    s.temperature = 0.35
    s.temperature = 0
    s.temperature = 0.33  # the whole row is shipped: any temperature, off the slider's steps too
    for bad in (2.5, -1):
        with pytest.raises(traitlets.TraitError, match=r"between 0 \(greedy\) and 2.0"):
            s.temperature = bad
    with pytest.raises(traitlets.TraitError, match=r"top_k=99 must be between 0 \(off\) and"):
        s.top_k = 99
    with pytest.raises(traitlets.TraitError, match="top_p=0.0"):
        s.top_p = 0.0
    with pytest.raises(traitlets.TraitError, match="min_p=1.5"):
        s.min_p = 1.5
    with pytest.raises(traitlets.TraitError, match=r"step=1 is out of range.*1 step"):
        s.step = 1
    with pytest.raises(ValueError, match="prompt is empty"):
        SamplingExplorer.from_model(model, tok, "")
    with pytest.raises(ValueError, match="block_size=48"):
        SamplingExplorer.from_model(model, tok, "x" * 0 + "the lazy dog " * 4)
    with pytest.raises(ValueError, match="finite"):
        SamplingExplorer(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="more than the 65,536"):
        SamplingExplorer(torch.zeros(MAX_VOCAB + 1))


# -- the two hosts ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["attention", "sampling"])
def test_mimebundle_has_live_view_and_self_contained_html(model: GPT, tok: CharTokenizer, kind: str) -> None:
    if kind == "attention":
        w = AttentionView.from_model(model, tok, PROMPT32, layer=1, head=2)
    else:
        w = SamplingExplorer.trace(model, tok, "the quick", 8, seed=0, temperature=0.8)
    data, _ = w._repr_mimebundle_()
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == w.model_id
    html = data["text/html"]
    assert not re.search(r"https?://", html)  # no CDN, no network
    assert re.search(r"<(link|img|iframe)\b|\bsrc=", html) is None  # and no external files
    assert _script_json(str(w._esm)) in html  # the very module anywidget runs
    assert html.count("</script>") == 1  # nothing in the payload closes the script early
    state = json.loads(re.search(r"const state = (.*);\n", html).group(1))
    assert state["_data"] == json.loads(json.dumps(w._data))
    if kind == "attention":
        assert (state["layer"], state["head"]) == (1, 2)
    else:
        assert state["temperature"] == 0.8 and state["step"] == 0
    assert "export default" in str(w._esm) and "http" not in str(w._esm)
    assert str(w._esm) == read_module(f"{kind}.js") and "function widgetRoot(" in str(w._esm)  # the prelude


def test_save_html_writes_a_standalone_page(model: GPT, tok: CharTokenizer, tmp_path) -> None:
    path = AttentionView.from_model(model, tok, "the fox").save_html(tmp_path / "a.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and 'type="module"' in page
    assert not re.search(r"https?://", page)


# -- matplotlib twins ---------------------------------------------------------------------------


def test_plot_attention(model: GPT, tok: CharTokenizer) -> None:
    view = AttentionView.from_model(model, tok, "the fox")
    fig, axes = plot_attention(view, layer=2)
    assert len(axes) == 4 and len(fig.axes) == 4
    assert axes[1].get_title() == "layer 2, head 1"
    plt.close(fig)
    fig, ax = plot_attention(view.attention, list("the fox"), layer=0, head=3)
    assert [t.get_text() for t in ax.get_xticklabels()] == list("the fox")
    assert np.ma.is_masked(ax.images[0].get_array()[0, 1])  # the causal upper triangle is blank
    plt.close(fig)
    with pytest.raises(ValueError, match="head=4"):
        plot_attention(view, head=4)


def test_plot_sampling(model: GPT, tok: CharTokenizer) -> None:
    s = SamplingExplorer.from_model(model, tok, "the quick", temperature=0.7, top_k=5)
    fig, ax = plot_sampling(s, n_top=10)
    assert len(ax.patches) == 11  # 10 tokens + "other"
    kept = [p for p in ax.patches if p.get_facecolor() == matplotlib.colors.to_rgba("tab:blue")]
    assert len(kept) == 5
    heights = [p.get_height() for p in ax.patches]
    probs = s.distribution()
    assert heights[:10] == pytest.approx(probs.sort(descending=True).values[:10].tolist(), abs=1e-7)
    assert sum(heights) == pytest.approx(1.0)
    assert f"5 of {tok.vocab_size} kept" in ax.get_title()
    plt.close(fig)
    fig, ax = plot_sampling(torch.randn(12), top_p=0.5)
    assert len(ax.patches) == 12  # a vocabulary that fits: no "other"
    plt.close(fig)


def test_glue_is_a_no_op_where_myst_nb_is_missing(monkeypatch, capsys) -> None:
    """Colab and a bare Jupyter have no myst-nb: gluing a figure must not fail there (the cell
    prints the number anyway)."""
    from minigpt.viz import glue

    monkeypatch.setitem(sys.modules, "myst_nb", None)  # import myst_nb now raises ImportError
    assert glue("loss", 1.25) is None
    assert capsys.readouterr().out == ""
