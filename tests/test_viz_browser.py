"""The widgets' static HTML in a real browser, with no kernel and no network: the attention view
follows its selects, the sampling explorer's numbers equal next_token_probs, the trace steps.

Needs Chromium and Playwright for Python (Playwright cannot download its own browser here):
    apt-get install -y chromium
    pip install playwright
Screenshots of both widgets, light and dark, go to $MINIGPT_SHOTS (else a pytest temporary folder).
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                                              "(pip install playwright)")

from conftest import CHROMIUM  # noqa: E402  (after the importorskip above)

from minigpt.chat import ChatSession  # noqa: E402
from minigpt.generate import next_token_probs  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.tokenizer import CharTokenizer  # noqa: E402
from minigpt.viz import AttentionView, ChatWidget, SamplingExplorer  # noqa: E402

if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

TEXT = "The quick brown fox jumps over the lazy dog; then it naps in the sun."

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>minigpt widgets</title>
<style>
  body {{ font-family: system-ui, sans-serif; margin: 24px; background: #fff; color: #1a1a1a; }}
  @media (prefers-color-scheme: dark) {{ body {{ background: #14181e; color: #e4e6ea; }} }}
  section {{ margin-bottom: 28px; width: fit-content; max-width: 100%; padding: 4px; }}
</style></head>
<body>
<section id="attention">{attention}</section>
<section id="trace">{trace}</section>
<section id="other">{other}</section>
<section id="chat">{chat}</section>
</body></html>
"""


@pytest.fixture(scope="module")
def widgets(tok: Any) -> dict[str, Any]:  # tok: conftest's, with the chat tokens
    chat_tok = tok
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(TEXT)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=32)).eval()
    with torch.no_grad():  # a random model with some contrast: sharper attention and logits
        model.transformer.wte.weight.mul_(4)
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(10)
    talker = GPT(GPTConfig(block_size=64, vocab_size=chat_tok.vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()
    chat = ChatWidget(ChatSession(talker, chat_tok, temperature=0.0, max_new_tokens=8), title="Chat, random model")
    return {
        "tok": tok,
        "attention": AttentionView.from_model(model, tok, "The quick brown fox jumps", title="Attention, random model"),
        "trace": SamplingExplorer.trace(model, tok, "The quick brown", 12, seed=0, temperature=0.8, top_k=12,
                                        title="Sampling trace (seed 0)"),
        # Fewer bars than the vocabulary: the rest share an "other" bar.
        "other": SamplingExplorer.from_model(model, tok, "The lazy dog", n_top=12, title="Next token, top 12"),
        "chat": chat.record(["Hello", "What is 2 + 2?"]),
    }


@pytest.fixture(scope="module")
def url(widgets: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("viz_page")
    html = PAGE.format(**{k: widgets[k]._repr_mimebundle_()[0]["text/html"] for k in ("attention", "trace", "other", "chat")})
    (root / "index.html").write_text(html, encoding="utf-8")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    finally:
        server.shutdown()
        server.server_close()



@pytest.fixture()
def page(browser: Any, url: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    errors: list[str] = []
    blocked: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)

    def only_local(route: Any) -> None:
        if route.request.url.startswith(url.rsplit("/", 1)[0]):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(url)
    page.wait_for_selector("#attention svg.mgv-heat")
    page.wait_for_selector("#trace .mgv-bars .mgv-row")
    page.wait_for_selector("#other .mgv-bars .mgv-row")
    page.wait_for_selector("#chat .mgv-log .mgv-turn")
    page.errors = errors  # type: ignore[attr-defined]
    yield page
    assert blocked == [], f"the page tried to reach the network: {blocked}"
    assert errors == [], errors
    context.close()


def heat(page: Any) -> dict[str, Any]:
    return page.eval_on_selector("#attention svg.mgv-heat", """svg => ({
        layer: +svg.dataset.layer, head: +svg.dataset.head, checksum: svg.dataset.checksum,
        cells: Array.from(svg.querySelectorAll('rect.mgv-cell'),
                          r => [+r.dataset.q, +r.dataset.k, +r.dataset.w, r.getAttribute('fill-opacity')]),
        masked: !!svg.querySelector('[data-role=masked]') })""")


def test_attention_view_follows_head_and_layer(page: Any, widgets: dict[str, Any]) -> None:
    view = widgets["attention"]
    before = heat(page)
    assert (before["layer"], before["head"]) == (0, 0) and before["masked"]
    T = view.T
    assert len(before["cells"]) == T * (T + 1) // 2  # only the lower triangle has cells

    def check(state: dict[str, Any], layer: int, head: int) -> None:
        assert (state["layer"], state["head"]) == (layer, head)
        for q, k, w, _ in state["cells"]:
            assert abs(w - view.attention[layer, head, q, k]) < 1e-4

    check(before, 0, 0)
    page.select_option("#attention select[data-role=head]", "2")
    after = heat(page)
    check(after, 0, 2)
    assert after["checksum"] != before["checksum"]
    assert [c[3] for c in after["cells"]] != [c[3] for c in before["cells"]]  # the colours changed
    page.select_option("#attention select[data-role=layer]", "1")
    check(heat(page), 1, 2)
    page.click("#attention button.mgv-thumb[data-head='3']")  # a thumbnail selects its head
    check(heat(page), 1, 3)
    assert page.input_value("#attention select[data-role=head]") == "3"
    assert page.get_attribute("#attention button.mgv-thumb.mgv-selected", "data-head") == "3"
    # Hover: "query → key: weight".
    page.hover("#attention rect.mgv-cell[data-q='5'][data-k='2']")
    status = page.text_content("#attention [data-role=status]")
    tokens = view.tokens
    assert status == f"{tokens[5]} (5) \u2192 {tokens[2]} (2): {view.attention[1, 3, 5, 2]:.3f}"


def rows(page: Any, section: str) -> dict[str, Any]:
    return page.eval_on_selector(f"#{section} .mgv-bars", """bars => ({
        step: +bars.dataset.step, entropy: +bars.dataset.entropy, kept: +bars.dataset.keptCount,
        rows: Array.from(bars.querySelectorAll('.mgv-row'),
                         r => [r.dataset.tokenId, +r.dataset.prob, r.dataset.kept === '1']) })""")


def set_slider(page: Any, section: str, name: str, value: float) -> None:
    page.fill(f"#{section} input[data-role={name}]", str(value))


def assert_matches_reference(shown: dict[str, Any], logits: torch.Tensor, settings: dict[str, Any]) -> None:
    ref = next_token_probs(logits[None].float(), temperature=settings["temperature"],
                           top_k=settings["top_k"] or None, top_p=settings["top_p"],
                           min_p=settings["min_p"])[0].double()
    explicit = [(int(t), p, kept) for t, p, kept in shown["rows"] if t != "other"]
    ids = [t for t, _, _ in explicit]
    for t, p, kept in explicit:
        assert abs(p - float(ref[t])) < 1e-4, (settings, t, p, float(ref[t]))
        assert kept == bool(ref[t] > 0), (settings, t)
    other = [p for t, p, _ in shown["rows"] if t == "other"]
    rest = np.setdiff1d(np.arange(logits.numel()), ids)
    if other:
        assert abs(other[0] - float(ref[rest].sum())) < 1e-4
    else:
        assert rest.size == 0  # every token has a bar
    q = ref[ref > 0]
    assert shown["kept"] == q.numel()
    assert abs(shown["entropy"] - float(-(q * q.log()).sum())) < 1e-4


SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.5, top_k=5, top_p=1.0, min_p=0.0),
    dict(temperature=1.5, top_k=0, top_p=0.8, min_p=0.0),
    dict(temperature=1.2, top_k=0, top_p=1.0, min_p=0.15),
    dict(temperature=0.75, top_k=10, top_p=0.9, min_p=0.05),
]


def apply(page: Any, section: str, settings: dict[str, Any]) -> None:
    for name, value in settings.items():
        set_slider(page, section, name, value)


def test_sampling_sliders_equal_next_token_probs(page: Any, widgets: dict[str, Any]) -> None:
    trace = widgets["trace"]
    start = rows(page, "trace")
    assert start["step"] == 0
    assert_matches_reference(start, trace.logits[0], dict(temperature=0.8, top_k=12, top_p=1.0, min_p=0.0))
    for settings in SETTINGS:
        apply(page, "trace", settings)
        assert_matches_reference(rows(page, "trace"), trace.logits[0], settings)
    # The keyboard works too: one step right on the top-k slider.
    page.focus("#trace input[data-role=top_k]")
    page.keyboard.press("ArrowRight")
    assert page.input_value("#trace input[data-role=top_k]") == "11"
    assert_matches_reference(rows(page, "trace"), trace.logits[0], {**SETTINGS[-1], "top_k": 11})


def test_sampling_other_block(page: Any, widgets: dict[str, Any]) -> None:
    w = widgets["other"]
    logits = w.logits[0]
    settings = [
        dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),  # everything kept
        dict(temperature=0.6, top_k=7, top_p=1.0, min_p=0.0),  # the others all removed
        dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5),
        dict(temperature=1.5, top_k=0, top_p=0.9, min_p=0.0),  # the nucleus ends among the others
        dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1),  # and so does min-p's threshold
    ]
    for s in settings:
        apply(page, "other", s)
        shown = rows(page, "other")
        assert_matches_reference(shown, logits, s)
        for name, value in s.items():
            setattr(w, name, value)
        assert shown["kept"] == int((w.distribution() > 0).sum())
    assert 12 < shown["kept"] < w.vocab_size  # some of the others kept, not all: one bar holds both


def test_trace_steps(page: Any, widgets: dict[str, Any]) -> None:
    trace = widgets["trace"]
    tok = widgets["tok"]
    settings = dict(temperature=0.8, top_k=12, top_p=1.0, min_p=0.0)
    for step in range(4):
        shown = rows(page, "trace")
        assert shown["step"] == step
        assert_matches_reference(shown, trace.logits[step], settings)
        chosen = page.get_attribute("#trace .mgv-row.mgv-chosen", "data-token-id")
        assert int(chosen) == trace.chosen[step]
        assert page.text_content("#trace .mgv-now") == tok.decode([trace.chosen[step]])
        page.click("#trace button[data-role=next]")
    page.click("#trace button[data-role=prev]")
    assert rows(page, "trace")["step"] == 3
    assert page.text_content("#trace [data-role=step-text]") == f"token 4 of {trace.n_steps}"
    # "What if": move a slider, then return to the sampler's own settings.
    apply(page, "trace", dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0))
    assert_matches_reference(rows(page, "trace"), trace.logits[3], dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0))
    page.click("#trace button[data-role=reset]")
    assert_matches_reference(rows(page, "trace"), trace.logits[3], settings)
    assert page.is_disabled("#trace button[data-role=next]") is False
    for _ in range(trace.n_steps):
        page.click("#trace button[data-role=next]") if not page.is_disabled("#trace button[data-role=next]") else None
    assert rows(page, "trace")["step"] == trace.n_steps - 1


def test_the_static_chat_shows_the_recorded_conversation_with_the_box_off(page: Any, widgets: dict[str, Any]) -> None:
    turns = page.eval_on_selector_all("#chat .mgv-turn", "ts => ts.map(t => t.textContent)")
    expected = [f"{'you' if t['role'] == 'user' else 'assistant'}>{t['content']}" for t in widgets["chat"].transcript]
    assert turns == expected and len(turns) == 4
    assert page.is_disabled("#chat [data-role=input]") and page.is_disabled("#chat [data-role=send]")
    assert "run the notebook" in page.inner_text("#chat [data-role=hint]")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_screenshots(browser: Any, url: str, scheme: str, shots_dir: Path) -> None:
    context = browser.new_context(viewport={"width": 1000, "height": 900}, color_scheme=scheme,
                                  device_scale_factor=1)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url.rsplit("/", 1)[0]) else r.abort())
    page.goto(url)
    page.wait_for_selector("#other .mgv-bars .mgv-row")
    page.select_option("#attention select[data-role=head]", "1")
    page.hover("#attention rect.mgv-cell[data-q='9'][data-k='4']")
    page.locator("#attention").screenshot(path=str(shots_dir / f"attention_{scheme}.png"))
    page.click("#trace button[data-role=next]")
    page.click("#trace button[data-role=next]")
    page.fill("#trace input[data-role=top_p]", "0.9")
    page.locator("#trace").screenshot(path=str(shots_dir / f"sampling_trace_{scheme}.png"))
    page.locator("#other").screenshot(path=str(shots_dir / f"sampling_other_{scheme}.png"))
    page.locator("#chat").screenshot(path=str(shots_dir / f"chat_{scheme}.png"))
    for name in ("attention", "sampling_trace", "sampling_other", "chat"):
        assert (shots_dir / f"{name}_{scheme}.png").stat().st_size > 5_000
    assert errors == []
    context.close()
