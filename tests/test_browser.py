"""The front end in a real browser: JupyterLab and the Voila app on 127.0.0.1, Debian's Chromium
driven by Playwright (never a downloaded browser). A box is dragged on the ipympl canvas with
mouse events; the test asserts that the mask overlay appeared (canvas pixels in the class colour)
and that the Python side changed (the widget's status line). Screenshots go to
``outputs/browser/``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(__file__).resolve().parents[1] / "outputs" / "browser"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (`make browser-deps`, i.e. "
                "`apt-get install -y chromium`)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

# The notebook the JupyterLab test runs: the sample, the segment widget on one cached slice,
# the target box as figure fractions (so the test knows where to drag), and the 3D view.
NOTEBOOK_CELLS = [
    "import json, numpy as np\n"
    "import ipywidgets as widgets\n"
    "from samliver.sample import load_sample\n"
    "from samliver.models import get_model\n"
    "from samliver.widgets import SegmentWidget\n"
    "vol = load_sample()\n"
    "z = int(np.argmax((vol.label >= 1).sum(axis=(1, 2))))\n"
    "w = SegmentWidget(vol, get_model('litemedsam', device='cpu'), slices=[z], z=z)\n"
    "w._ensure_embedding(z)\n"
    "ys, xs = np.nonzero(vol.label[z] >= 1)\n"
    "w.fig.canvas.draw()\n"
    "inv = w.fig.transFigure.inverted()\n"
    "a = inv.transform(w.ax.transData.transform((xs.min(), ys.min())))\n"
    "b = inv.transform(w.ax.transData.transform((xs.max(), ys.max())))\n"
    "target = widgets.Label('target ' + json.dumps([float(a[0]), float(a[1]), float(b[0]), float(b[1])]))\n"
    "w.message('ready: drag a box')\n"
    "display(widgets.VBox([w.widget, target]))",
    "from samliver.view3d import view_3d\n"
    "view_3d(vol.label, vol.spacing, max_faces=8000)",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jupyter_env(home: Path) -> dict:
    env = dict(os.environ, JUPYTER_CONFIG_DIR=f"{home}/cfg", JUPYTER_RUNTIME_DIR=f"{home}/rt",
               JUPYTER_DATA_DIR=f"{home}/data", JUPYTERLAB_SETTINGS_DIR=f"{home}/settings",
               JUPYTERLAB_WORKSPACES_DIR=f"{home}/ws", IPYTHONDIR=f"{home}/ipy",
               MPLCONFIGDIR=f"{home}/mpl", SAMLIVER_FAST="1")
    return env


def _serve(cmd: list[str], cwd: Path, env: dict, url: str, log: Path):
    handle = open(log, "wb")
    proc = subprocess.Popen(["timeout", "900", *cmd], cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, handle
        except Exception:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    _stop(proc, handle)
    pytest.fail(f"server did not start: {' '.join(cmd)}\n{log.read_text()[-2000:]}")


def _stop(proc, handle) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # our own session: the server and its kernels
    except ProcessLookupError:
        pass
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    handle.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    import nbformat

    from samliver.sample import fetch_sample

    fetch_sample()  # before the servers start, so the kernels find it cached
    d = tmp_path_factory.mktemp("browser")
    _train_small_head(d / "head.pt")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK_CELLS]
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(nb, d / "segment.ipynb")
    SHOTS.mkdir(parents=True, exist_ok=True)
    return d


def _train_small_head(path: Path) -> Path:
    """A linear head on four cached sample slices (seconds): the app's whole-volume step needs one."""
    from samliver.embeddings import embed_volume
    from samliver.models import get_model
    from samliver.sample import load_sample
    from samliver.training import TrainConfig, train_head
    from samliver.training_data import slice_tensors

    volume, model = load_sample(), get_model("litemedsam", device="cpu")
    train = [58, 62, 66, 70]  # inside the app's FAST range (the middle 16 slices)
    emb = embed_volume(volume, model, slices=train, progress=False)
    x, y, images = slice_tensors(volume, emb, train)
    info = {"model_name": model.name, "weights_id": model.weights_id, "window": "abdomen"}
    train_head(x, y, images=images, config=TrainConfig(kind="linear", steps=25, val_fraction=0.0), model=model,
               model_info=info, checkpoint=path, progress=False)
    return path


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _class_pixels(png: bytes) -> int:
    """Pixels in the liver colour family (green dominant) in a screenshot."""
    import io

    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((g - r > 40) & (g - b > 15)).sum())


def _drag_box(page, canvas, target_text: str) -> None:
    fx0, fy0, fx1, fy1 = json.loads(target_text.split("target ", 1)[1])
    box = canvas.bounding_box()
    x0, y0 = box["x"] + fx0 * box["width"], box["y"] + (1 - fy0) * box["height"]
    x1, y1 = box["x"] + fx1 * box["width"], box["y"] + (1 - fy1) * box["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    for t in (0.25, 0.5, 0.75, 1.0):
        page.mouse.move(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
        time.sleep(0.1)
    page.mouse.up()


def _run_all_cells(page, nb) -> None:
    """Run > Run All Cells once the kernel is really connected.

    The toolbar's idle indicator can show before the kernel's session is connected, and a Run
    All issued then is silently dropped: wait for the status bar's "Idle", and click again if
    the first cell has not started after a few seconds.
    """
    from playwright.sync_api import expect

    nb.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=120_000)
    expect(page.locator(".jp-StatusBar-Widget", has_text="Idle").first).to_be_visible(timeout=120_000)
    first_prompt = nb.locator(".jp-InputArea-prompt").first
    for _ in range(5):
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            expect(first_prompt).not_to_have_text("[ ]:", timeout=10_000)
            return
        except AssertionError:
            page.keyboard.press("Escape")
    pytest.fail("JupyterLab did not start running the notebook's cells")


def _wait_canvas(page, scope: str) -> None:
    page.wait_for_function(f"""() => {{ const d = document.querySelector('{scope} .jupyter-matplotlib-canvas-div');
        return d && d.getBoundingClientRect().width > 50; }}""", timeout=120_000)


def test_jupyterlab_box_on_canvas_segments_and_3d_view_renders(workdir, browser):
    from playwright.sync_api import expect

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc, handle = _serve([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
                           "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.ip=127.0.0.1"],
                          workdir, _jupyter_env(workdir / "jhome"), f"{url}/lab", workdir / "lab.log")
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    try:
        page.goto(f"{url}/lab/tree/segment.ipynb?reset", timeout=120_000)
        nb = page.locator(".jp-NotebookPanel:visible")
        _run_all_cells(page, nb)
        _wait_canvas(page, ".jp-NotebookPanel:not(.lm-mod-hidden)")
        expect(nb.locator(".widget-label", has_text="ready: drag a box")).to_be_visible(timeout=120_000)
        target = nb.locator(".widget-label", has_text="target [").first.inner_text()
        canvas = nb.locator(".jupyter-matplotlib-canvas-div canvas").last
        canvas.scroll_into_view_if_needed()
        before = _class_pixels(canvas.screenshot())
        page.screenshot(path=str(SHOTS / "lab_before_box.png"))
        _drag_box(page, canvas, target)
        expect(nb.locator(".widget-label", has_text="mask:")).to_be_visible(timeout=60_000)
        expect(nb.locator(".widget-label", has_text="decoder:")).not_to_have_text("decoder: - ms")
        status = nb.locator(".widget-label", has_text="mask:").first.inner_text()
        n_px = int(status.split("mask:")[1].split("px")[0])
        assert n_px > 500, status
        page.wait_for_timeout(1500)  # the redrawn frame travels to the browser
        after = _class_pixels(canvas.screenshot())
        page.screenshot(path=str(SHOTS / "lab_after_box.png"))
        assert after > before + 500, (before, after)
        # the offline 3D view (plotly via anywidget) draws its WebGL scene
        plot = nb.locator(".js-plotly-plot").first
        plot.wait_for(timeout=120_000)
        plot.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(SHOTS / "lab_3d_view.png"))
        assert nb.locator(".js-plotly-plot .gl-container canvas, .js-plotly-plot canvas").count() >= 1
    finally:
        page.close()
        _stop(proc, handle)


def test_voila_app_box_segments_and_head_gives_burden_download_and_3d_view(workdir, browser):
    from playwright.sync_api import expect

    from samliver.app import notebook_path

    app_nb = workdir / "app.ipynb"
    shutil.copy(notebook_path(), app_nb)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc, handle = _serve([sys.executable, "-m", "voila", str(app_nb), f"--port={port}", "--no-browser",
                           "--Voila.ip=127.0.0.1"], workdir, _jupyter_env(workdir / "vhome"), url,
                          workdir / "voila.log")
    page = browser.new_page(viewport={"width": 1280, "height": 1300})
    try:
        page.goto(url, timeout=180_000)
        expect(page.get_by_text("Choose a CT and press")).to_be_visible(timeout=180_000)
        page.locator("button[title='load']").click()
        expect(page.get_by_text("loaded lits_117")).to_be_visible(timeout=180_000)
        page.get_by_text("segment (box / click)").click()
        _wait_canvas(page, ".widget-tab-contents, .jupyter-widgets")
        canvas = page.locator(".jupyter-matplotlib-canvas-div:visible canvas").last
        canvas.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        box = canvas.bounding_box()
        before = _class_pixels(canvas.screenshot())
        page.screenshot(path=str(SHOTS / "voila_before_box.png"))
        # the sample's liver fills the upper-left middle of the slice; a generous box is enough
        page.mouse.move(box["x"] + 0.25 * box["width"], box["y"] + 0.25 * box["height"])
        page.mouse.down()
        for t in (0.3, 0.5, 0.7):
            page.mouse.move(box["x"] + t * box["width"], box["y"] + t * box["height"])
            time.sleep(0.1)
        page.mouse.up()
        status = page.locator(".widget-label:visible", has_text="mask:")
        expect(status).to_be_visible(timeout=90_000)  # written by the Python side
        n_px = int(status.first.inner_text().split("mask:")[1].split("px")[0])
        assert n_px > 500, n_px
        page.wait_for_timeout(1500)
        after = _class_pixels(canvas.screenshot())
        page.screenshot(path=str(SHOTS / "voila_after_box.png"))
        assert after > before + 500, (before, after)
        # whole volume: a trained head, the tumour burden, the download link and the 3D view
        page.get_by_text("whole volume (head)").click()
        head_input = page.get_by_role("textbox", name="head", exact=True)
        head_input.fill(str(workdir / "head.pt"))
        head_input.press("Enter")
        page.locator("button:visible", has_text="run head on volume").click()
        expect(page.get_by_text("tumour burden:")).to_be_visible(timeout=240_000)
        assert "liver" in page.locator(".widget-html:visible", has_text="tumour burden:").first.inner_text()
        expect(page.locator("a[download]:visible")).to_have_count(1, timeout=30_000)
        plot = page.locator(".js-plotly-plot:visible").first
        plot.wait_for(timeout=120_000)
        plot.scroll_into_view_if_needed()
        page.wait_for_timeout(1500)
        assert page.locator(".js-plotly-plot:visible canvas").count() >= 1
        page.screenshot(path=str(SHOTS / "voila_head_3d.png"), full_page=True)
    finally:
        page.close()
        _stop(proc, handle)
