"""The front end in a real browser: JupyterLab and the Voila app on 127.0.0.1, Debian's Chromium
driven by Playwright (never a downloaded browser). The annotation loop as a user runs it: boxes
dragged on the ipympl canvas of two slices (SAM's mask appears in its own colour), accepted,
*train* pressed; the test waits for the Python side (status line, training summary, state),
then asserts the head's outline pixels on an unlabelled slice; and that the NiiVue viewer's
WebGL canvas is not blank. Screenshots go to ``outputs/browser/``.
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

# The notebook the JupyterLab test runs: the sample, the annotation widget (a FAST linear head),
# the liver's box on two slices as figure fractions (so the test knows where to drag), a label
# the Python side writes after training, and the NiiVue viewer.
Z1, Z2, Z3 = 56, 72, 64  # two slices to box, one left unlabelled to look at the prediction
NOTEBOOK_CELLS = [
    "import json, numpy as np\n"
    "import ipywidgets as widgets\n"
    "from samliver.sample import load_sample\n"
    "from samliver.models import get_model\n"
    "from samliver.embeddings import embed_volume\n"
    "from samliver.widgets import AnnotateWidget\n"
    "vol = load_sample()\n"
    "model = get_model('litemedsam', device='cpu')\n"
    f"w = AnnotateWidget(vol, model, embeddings=embed_volume(vol, model, progress=False), z={Z1})\n"
    "w.fig.canvas.draw()\n"
    "inv = w.fig.transFigure.inverted()\n"
    "def target(z):\n"
    "    ys, xs = np.nonzero(vol.label[z] >= 1)\n"
    "    a = inv.transform(w.ax.transData.transform((xs.min(), ys.min())))\n"
    "    b = inv.transform(w.ax.transData.transform((xs.max(), ys.max())))\n"
    "    return f'target{z} ' + json.dumps([float(a[0]), float(a[1]), float(b[0]), float(b[1])])\n"
    "state = widgets.Label('state: untrained')\n"
    "w.on_trained.append(lambda w: setattr(state, 'value', 'state: confirmed=' + "
    "json.dumps(sorted(w.session.confirmed)) + ' predicted=' + str(w.session.prediction is not None)))\n"
    f"targets = widgets.VBox([widgets.Label(target({Z1})), widgets.Label(target({Z2}))])\n"
    "w.message('ready: drag a box')\n"
    "display(widgets.VBox([w.widget, targets, state]))",
    "from samliver.viewer import show_volume\n"
    "show_volume(vol, prediction=vol.label, height=420)",
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
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK_CELLS]
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(nb, d / "segment.ipynb")
    SHOTS.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


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


def _pixels(png: bytes, kind: str) -> int:
    """Pixels of one overlay colour family in a screenshot: ``liver`` (green dominant: the
    class colour, filled or as the head's outline) or ``candidate`` (magenta: SAM's mask)."""
    import io

    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if kind == "candidate":
        return int(((r - g > 60) & (b - g > 60)).sum())
    return int(((g - r > 40) & (g - b > 15)).sum())


def _nonblank(png: bytes) -> tuple[float, int]:
    """(standard deviation of grey levels, number of distinct grey levels) of a screenshot."""
    import io

    from PIL import Image

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L")).astype(float)
    return float(grey.std()), len(np.unique(grey))


def _go_to_slice(page, scope, z: int) -> None:
    """Type a slice number into the slider's editable readout; wait for the kernel's answer."""
    from playwright.sync_api import expect

    readout = scope.locator(".widget-readout").first
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(z))
    page.keyboard.press("Enter")
    expect(scope.locator(".widget-label", has_text=f"slice {z}:").first).to_be_visible(timeout=30_000)
    page.wait_for_timeout(800)  # the redrawn frame travels to the browser


def _box_and_accept(page, scope, canvas, fractions) -> None:
    from playwright.sync_api import expect

    before = _pixels(canvas.screenshot(), "candidate")
    _drag_fractions(page, canvas, fractions)
    status = scope.locator(".widget-label", has_text="SAM mask:").first
    expect(status).to_be_visible(timeout=60_000)
    n_px = int(status.inner_text().split("SAM mask:")[1].split("px")[0])
    assert n_px > 500, status.inner_text()
    page.wait_for_timeout(1200)
    after = _pixels(canvas.screenshot(), "candidate")
    assert after > before + 500, ("SAM's mask is not drawn in its own colour", before, after)
    scope.locator("button:visible", has_text="accept").first.click()
    expect(scope.locator(".widget-label", has_text="accepted").first).to_be_visible(timeout=30_000)


def _drag_fractions(page, canvas, fractions) -> None:
    fx0, fy0, fx1, fy1 = fractions
    box = canvas.bounding_box()
    x0, y0 = box["x"] + fx0 * box["width"], box["y"] + (1 - fy0) * box["height"]
    x1, y1 = box["x"] + fx1 * box["width"], box["y"] + (1 - fy1) * box["height"]
    page.mouse.move(x0, y0)
    page.mouse.down()
    for t in (0.25, 0.5, 0.75, 1.0):
        page.mouse.move(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
        time.sleep(0.1)
    page.mouse.up()


def _train_and_check_prediction(page, scope, canvas, z_unlabelled: int, shot: str) -> None:
    """Press train; wait for the Python side; the head's outlines on an unlabelled slice."""
    from playwright.sync_api import expect

    _go_to_slice(page, scope, z_unlabelled)
    before = _pixels(canvas.screenshot(), "liver")
    scope.locator("button:visible", has_text="train").first.click()
    expect(scope.locator(".widget-label", has_text="trained on 2 slices").first).to_be_visible(timeout=180_000)
    expect(scope.locator(".widget-html", has_text="last training").first).to_be_visible(timeout=10_000)
    assert "final loss" in scope.locator(".widget-html", has_text="last training").first.inner_text()
    expect(scope.locator("button:visible", has_text="train").first).to_be_enabled(timeout=60_000)
    page.wait_for_timeout(1500)
    after = _pixels(canvas.screenshot(), "liver")
    page.screenshot(path=str(SHOTS / shot), full_page=True)
    assert after > before + 300, ("no prediction outline on the unlabelled slice", before, after)


def _niivue_canvas_is_drawn(page, scope, shot: str) -> None:
    """The viewer's WebGL2 canvas shows the CT: its screenshot is not one flat colour."""
    found = page.wait_for_function("""() => {
        for (const c of document.querySelectorAll('canvas')) {
            const r = c.getBoundingClientRect();
            if (r.width < 100 || r.height < 100 || c.closest('.jupyter-matplotlib, .js-plotly-plot')) continue;
            if (c.getContext('webgl2')) { c.setAttribute('data-test', 'niivue'); return true; }
        }
        return false; }""", timeout=120_000)
    assert found
    canvas = page.locator("canvas[data-test='niivue']").first
    canvas.scroll_into_view_if_needed()
    page.wait_for_timeout(3000)  # software WebGL draws the volume
    png = canvas.screenshot()
    (SHOTS / shot).write_bytes(png)
    std, levels = _nonblank(png)
    assert std > 10 and levels > 20, ("the NiiVue canvas is blank", std, levels)


def test_jupyterlab_annotation_loop_and_niivue(workdir, browser):
    from playwright.sync_api import expect

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc, handle = _serve([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
                           "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.ip=127.0.0.1"],
                          workdir, _jupyter_env(workdir / "jhome"), f"{url}/lab", workdir / "lab.log")
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    try:
        page.goto(f"{url}/lab/tree/segment.ipynb?reset", timeout=120_000)
        nb = page.locator(".jp-NotebookPanel:visible")
        _run_all_cells(page, nb)
        _wait_canvas(page, ".jp-NotebookPanel:not(.lm-mod-hidden)")
        expect(nb.locator(".widget-label", has_text="ready: drag a box")).to_be_visible(timeout=120_000)
        targets = {z: json.loads(nb.locator(".widget-label", has_text=f"target{z} [").first.inner_text()
                                 .split(" ", 1)[1]) for z in (Z1, Z2)}
        canvas = nb.locator(".jupyter-matplotlib-canvas-div canvas").last
        canvas.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(SHOTS / "lab_before_box.png"))
        _box_and_accept(page, nb, canvas, targets[Z1])
        _go_to_slice(page, nb, Z2)
        _box_and_accept(page, nb, canvas, targets[Z2])
        _train_and_check_prediction(page, nb, canvas, Z3, "lab_after_train.png")
        expect(nb.locator(".widget-label", has_text=f"state: confirmed=[{Z1}, {Z2}] predicted=True")
               ).to_be_visible(timeout=10_000)
        _niivue_canvas_is_drawn(page, nb, "lab_niivue.png")
    finally:
        page.close()
        _stop(proc, handle)


def test_voila_app_label_a_volume_train_download_and_viewer(workdir, browser):
    from playwright.sync_api import expect

    from samliver.app import notebook_path

    app_nb = workdir / "app.ipynb"
    shutil.copy(notebook_path(), app_nb)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc, handle = _serve([sys.executable, "-m", "voila", str(app_nb), f"--port={port}", "--no-browser",
                           "--Voila.ip=127.0.0.1"], workdir, _jupyter_env(workdir / "vhome"), url,
                          workdir / "voila.log")
    page = browser.new_page(viewport={"width": 1280, "height": 1500})
    try:
        page.goto(url, timeout=180_000)
        expect(page.get_by_text("Choose a CT and press")).to_be_visible(timeout=180_000)
        page.locator("button[title='load']").click()
        expect(page.get_by_text("loaded lits_117")).to_be_visible(timeout=180_000)
        page.locator(".lm-TabBar-tabLabel", has_text="label a volume").click()
        _wait_canvas(page, ".widget-tab-contents, .jupyter-widgets")
        tab = page.locator(".widget-tab-contents .widget-vbox:visible").first
        canvas = page.locator(".jupyter-matplotlib-canvas-div:visible canvas").last
        canvas.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(SHOTS / "voila_before_box.png"))
        # the sample's liver fills the upper right of its middle slices (x 60..120, y 5..60 of
        # 128 pixels): this box, as fractions of the canvas (y from the bottom), holds it
        liver_box = (0.5, 0.92, 0.88, 0.55)
        _box_and_accept(page, tab, canvas, liver_box)
        _go_to_slice(page, tab, Z1)
        _box_and_accept(page, tab, canvas, liver_box)
        _train_and_check_prediction(page, tab, canvas, Z2, "voila_after_train.png")
        tab.locator("button:visible", has_text="save").last.click()
        expect(page.locator("a[download]:visible")).to_have_count(2, timeout=60_000)
        page.locator(".lm-TabBar-tabLabel", has_text="whole volume").click()
        expect(page.get_by_text("tumour burden (head trained here")).to_be_visible(timeout=60_000)
        _niivue_canvas_is_drawn(page, page.locator(".widget-tab-contents"), "voila_niivue.png")
        page.screenshot(path=str(SHOTS / "voila_whole_volume.png"), full_page=True)
    finally:
        page.close()
        _stop(proc, handle)
