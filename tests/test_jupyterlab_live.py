"""A live JupyterLab in headless Chromium: the attention view runs as a real widget with a kernel,
and a head chosen in the browser's select reaches the kernel (``w.head`` changes in Python).

This is the path the static-page tests (test_viz_browser.py) cannot cover: anywidget's front end
in JupyterLab, the comm between page and kernel, and the trait sync back to Python.

Needs Chromium and Playwright for Python (Playwright cannot download its own browser here):
    apt-get install -y chromium
    pip install playwright jupyterlab
Every process started here (the server and its kernels) is stopped at the end, even on failure.
A screenshot of the widget in JupyterLab goes to $MINIGPT_SHOTS (else a pytest temporary folder).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                                              "(pip install playwright)")
pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (pip install jupyterlab)")
psutil = pytest.importorskip("psutil", reason="psutil (a dependency of ipykernel) is not installed")

from conftest import CHROMIUM  # noqa: E402  (after the importorskip above)

if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

START_TIMEOUT = 60.0  # seconds for the server to answer
UI_TIMEOUT_MS = 60_000  # for the page, the kernel and the widget to appear

# The notebook the browser runs: a tiny random GPT (no training, no data), its attention view, and
# a cell that reports what the kernel sees.
CELLS = [
    "import minigpt\n"
    "import torch\n"
    "from minigpt.model import GPT, GPTConfig\n"
    "from minigpt.tokenizer import CharTokenizer\n"
    "from minigpt.viz import AttentionView\n"
    "\n"
    "print('profile', minigpt.recipe().name)\n"
    "tok = CharTokenizer.from_text('the quick brown fox jumps over the lazy dog')\n"
    "torch.manual_seed(0)\n"
    "model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=32)).eval()\n"
    "with torch.no_grad():  # sharper attention than a fresh init, so the heads differ visibly\n"
    "    model.transformer.wte.weight.mul_(4)\n"
    "    for block in model.transformer.h:\n"
    "        block.attn.c_attn.weight.mul_(10)\n"
    "w = AttentionView.from_model(model, tok, 'the quick brown fox', title='live test')\n",
    "w",
    "print(f'kernel sees head={w.head} layer={w.layer}')",
]


def notebook_json() -> str:
    cells = [{"cell_type": "code", "execution_count": None, "id": f"cell-{i}", "metadata": {}, "outputs": [],
              "source": src} for i, src in enumerate(CELLS)]
    nb = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                       "language_info": {"name": "python"}}}
    return json.dumps(nb, indent=1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and every process it started, kernels included.

    jupyter_client starts kernels in sessions of their own, so killing the server's process group
    would leave them behind: collect the server's descendants first, ask the server to shut down
    (SIGTERM: it shuts its kernels down), then kill whatever of that list is still alive.
    """
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is the server's
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A JupyterLab server on 127.0.0.1 with a token, in a temporary root, at MINIGPT_PROFILE=ci."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    (root / "live.ipynb").write_text(notebook_json(), encoding="utf-8")
    # No "get official Jupyter news?" toast and no update check: nothing asks for the network.
    settings = base / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}), encoding="utf-8")
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "MINIGPT_PROFILE": "ci",
           # Keep the user's Jupyter and IPython settings out, and ours out of their home.
           "JUPYTER_CONFIG_DIR": str(base / "config"), "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
           "IPYTHONDIR": str(base / "ipython"), "JUPYTER_PLATFORM_DIRS": "1",
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={base / 'settings'}",
           f"--LabApp.workspaces_dir={base / 'workspaces'}", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path = base / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {START_TIMEOUT:.0f} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield {"url": url, "token": token, "root": root, "log": log_path, "proc": proc}
    finally:
        stop_tree(proc)



def test_head_chosen_in_the_browser_reaches_the_kernel(lab: dict[str, Any], browser: Any, shots_dir: Path) -> None:
    expect = sync_api.expect
    expect.set_options(timeout=UI_TIMEOUT_MS)
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    errors: list[str] = []
    blocked: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))

    def only_local(route: Any) -> None:
        if route.request.url.startswith(lab["url"]):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    # The toolbar says "idle" for a moment before the kernel's websocket even opens, and cells run
    # then are silently dropped; a message received from the kernel is the reliable sign.
    kernel_messages: list[int] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda _: kernel_messages.append(1))
            if "/api/kernels/" in ws.url else None)
    try:
        page.goto(f"{lab['url']}/lab/tree/live.ipynb?token={lab['token']}")
        notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        cells = notebook.locator(".jp-Notebook .jp-Cell")
        expect(cells).to_have_count(len(CELLS))
        deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
        while not kernel_messages:
            assert time.monotonic() < deadline, "no message from the kernel: it did not start"
            page.wait_for_timeout(100)
        expect(notebook.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(1)

        # Run > Run All Cells, through the menu as a reader would.
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

        view = cells.nth(1).locator(".jp-OutputArea-output")
        head_select = view.locator("select[data-role=head]")
        expect(head_select).to_have_count(1)  # the live widget, drawn by anywidget with the kernel
        expect(view.locator("svg.mgv-heat")).to_have_attribute("data-head", "0")
        report = cells.nth(2).locator(".jp-OutputArea-output")
        expect(report).to_contain_text("kernel sees head=0 layer=0")
        expect(cells.nth(0).locator(".jp-OutputArea-output")).to_contain_text("profile ci")

        # Change the head in the browser: the heatmap follows at once, with no kernel round trip ...
        heat = view.locator("svg.mgv-heat")
        before = heat.get_attribute("data-checksum")
        head_select.select_option("2")
        expect(heat).to_have_attribute("data-head", "2")
        assert heat.get_attribute("data-checksum") != before  # another head's weights are drawn
        # ... and the synced trait reaches Python: run the report cell again.
        cells.nth(2).locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        expect(report).to_contain_text("kernel sees head=2 layer=0")

        cells.nth(1).screenshot(path=str(shots_dir / "jupyterlab_attention_view.png"))
        assert errors == [], errors
        assert blocked == [], f"JupyterLab tried to reach the network: {blocked}"
    except Exception:
        page.screenshot(path=str(shots_dir / "jupyterlab_failure.png"))
        print(f"server log ({lab['log']}):\n{lab['log'].read_text()[-3000:]}")
        raise
    finally:
        context.close()
