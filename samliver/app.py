"""The Voila front end: ``samliver app [--port P]``.

Choose the sample case, a path or an uploaded file; browse it; label it in the annotation loop
(box a few slices, train a head, see the whole volume, fix the suggested slices, repeat); look at
it in the NiiVue viewer; run a saved head; see the tumour burden; download the label NIfTI and
the head. The served notebook (``samliver/app_notebook.ipynb``, package data) only calls
:func:`build_app`; the logic lives in :class:`App`, whose methods tests call directly.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_WINDOW
from .util import SamliverError, fast_mode

DEFAULT_HEAD = "outputs/head.pt"  # where `samliver demo` writes its trained head
# `samliver app` records the folder it was started in: Voila runs the notebook in the package
# folder, so relative paths typed by the user (and DEFAULT_HEAD) resolve against this instead.
CWD_ENV = "SAMLIVER_APP_CWD"


def user_path(path: str | os.PathLike) -> Path:
    """A path typed in the app, relative to the folder `samliver app` was started in.

    Args:
        path: absolute, ``~``-prefixed or relative path.

    Returns:
        An absolute path (relative ones joined to ``$SAMLIVER_APP_CWD``, else the cwd).
    """
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(os.environ.get(CWD_ENV) or os.getcwd()) / p


def port_free(ip: str, port: int) -> bool:
    """True when a TCP server could listen on ``ip:port`` now."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


def notebook_path() -> Path:
    """The app notebook shipped as package data."""
    return Path(str(resources.files("samliver") / "app_notebook.ipynb"))


def download_link_html(path: str | os.PathLike, label: str | None = None) -> str:
    """An ``<a download>`` link carrying the file as a data URI (works in Voila, offline)."""
    path = Path(path)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = path.name
    return (f"<a download='{name}' href='data:application/octet-stream;base64,{data}' "
            f"style='font-weight:bold'>⬇ {label or 'download ' + name}</a> ({path.stat().st_size / 1024:.0f} KiB)")


class App:
    """The app's state and actions; ``App().widget`` is the whole user interface.

    Tabs: *browse* (slices with an overlay that says whether it is the reference label or a
    head's prediction), *label a volume* (the annotation loop of
    :class:`samliver.widgets.AnnotateWidget`: box a few slices, train, fix, repeat, then
    download the label NIfTI and the head), *whole volume* (the NiiVue viewer with the
    prediction and reference as layers, or plotly without ipyniivue; tumour burden; a saved
    head can be run here too).

    Args:
        model_name: SAM model for segmenting and heads (default ``"litemedsam"``).
        model: an already loaded ``SamModel`` (tests pass the tiny one).
        head_path: default head checkpoint (``outputs/head.pt``, written by ``samliver demo``).
        out_dir: where labels, heads and sessions are written (default: a new temporary folder).
        config: the ``TrainConfig`` of the loop's head (default: the session's).
        background: run training in a worker thread (default True; tests pass False).
        viewer: ``"auto"`` (NiiVue if installed, else plotly), ``"niivue"`` or ``"plotly"``.
    """

    def __init__(self, *, model_name: str = "litemedsam", model: Any = None,
                 head_path: str = DEFAULT_HEAD, out_dir: str | None = None, config: Any = None,
                 background: bool = True, viewer: str = "auto") -> None:
        import ipywidgets as widgets

        self.model_name = model_name
        self._model = model
        self.config = config
        self.background = background
        self.viewer_backend = viewer
        self.volume = None
        self.prediction: np.ndarray | None = None
        self.prediction_source = ""
        self.browser = None
        self.annotator = None
        self.viewer = None
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="samliver_app_"))
        self.source_dd = widgets.ToggleButtons(options=["sample", "path", "upload"], value="sample",
                                               description="CT from")
        self.path_text = widgets.Text(placeholder="/path/to/ct.nii.gz or DICOM folder", description="path",
                                      layout=widgets.Layout(width="420px"))
        self.upload = widgets.FileUpload(accept=".nii,.gz,.mrc", multiple=False, description="upload")
        self.b_load = widgets.Button(description="load", button_style="primary", icon="folder-open")
        self.head_text = widgets.Text(value=head_path, description="head", layout=widgets.Layout(width="420px"))
        self.b_head = widgets.Button(description="run head on volume", button_style="warning")
        self.head_progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(
            width="240px", visibility="hidden"))
        self.head_status = widgets.Label("")
        self.status = widgets.HTML("Choose a CT and press <b>load</b>.")
        self.summary = widgets.HTML("")
        self.burden_html = widgets.HTML("")
        self.download = widgets.HTML("")
        self.overlay_note = widgets.HTML("")
        self.overlay_choice = widgets.ToggleButtons(options=[("reference label", "reference")], description="overlay")
        self.overlay_choice.observe(lambda ch: self.show_overlay(ch["new"]), names="value")
        self.browse_box = widgets.VBox([])
        self.segment_box = widgets.VBox([])
        self.view3d_box = widgets.VBox([])
        self.b_load.on_click(lambda _: self.load_from_ui())
        self.b_head.on_click(lambda _: self.run_head(self.head_text.value))
        whole = widgets.VBox([
            widgets.HTML("The whole volume: the CT in three linked planes and 3D with the label layers "
                         "(switch them in the legend). Train a head in <i>label a volume</i>, or run a saved "
                         "head here:"),
            widgets.HBox([self.head_text, self.b_head]),
            widgets.HBox([self.head_progress, self.head_status]),
            self.burden_html, self.download, self.view3d_box])
        tabs = widgets.Tab(children=[self.browse_box, self.segment_box, whole])
        for i, title in enumerate(["browse", "label a volume", "whole volume"]):
            tabs.set_title(i, title)
        self.tabs = tabs
        self.widget = widgets.VBox([
            widgets.HTML("<h2>samliver: liver and tumour segmentation with SAM</h2>"
                         "<p>Choose a CT (the sample case, a path or an upload) and press <b>load</b>. "
                         "In <b>label a volume</b>, box the liver on a few slices, press <b>train</b> and the "
                         "head labels every other slice in seconds; fix the slices it suggests, train again, "
                         "then save and download the label (NIfTI) and the head.</p>"),
            widgets.HBox([self.source_dd, self.b_load]),
            widgets.HBox([self.path_text, self.upload]),
            self.status, self.summary, tabs,
        ])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def message(self, text: str, error: bool = False) -> None:
        colour = "#b00020" if error else "#333"
        self.status.value = f"<span style='color:{colour}'>{'⚠ ' if error else ''}{text}</span>"

    @property
    def model(self):
        if self._model is None:
            from .models import get_model

            self.message(f"loading {self.model_name} ...")
            self._model = get_model(self.model_name)
        return self._model

    @property
    def segmenter(self):
        """The label tab's widget (an ``AnnotateWidget``)."""
        return self.annotator

    # ---- loading
    def load_from_ui(self) -> bool:
        choice = self.source_dd.value
        if choice == "sample":
            return self.load("sample")
        if choice == "path":
            return self.load(self.path_text.value.strip())
        files = self.upload.value
        if not files:
            self.message("Choose a file with the upload button first (.nii, .nii.gz or .mrc).", error=True)
            return False
        item = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
        return self.load_bytes(item["name"], bytes(item["content"]))

    def load_bytes(self, name: str, content: bytes) -> bool:
        """Load an uploaded file (its name gives the format)."""
        name = Path(name).name
        if not name.endswith((".nii", ".nii.gz", ".mrc")):
            self.message(f"{name} is not a CT file samliver reads from an upload: use .nii, .nii.gz or .mrc "
                         "(for DICOM, give the folder's path).", error=True)
            return False
        path = self.out_dir / "uploads" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return self.load(str(path))

    def load(self, source: str) -> bool:
        """Load ``"sample"`` or a path; on bad input show the reason and return False."""
        from .io import load_volume

        if not source:
            self.message("Type the path of a NIfTI file, DICOM folder or .mrc file.", error=True)
            return False
        try:
            if source == "sample":
                from .sample import load_sample

                self.message("fetching the sample case ...")
                volume = load_sample()
            else:
                volume = load_volume(user_path(source))
        except SamliverError as err:
            self.message(str(err), error=True)
            return False
        except Exception as err:  # noqa: BLE001 - an unreadable file is a user problem here
            self.message(f"{source} could not be read as a CT volume ({type(err).__name__}: {err}). "
                         "Use a NIfTI file, a DICOM folder or a .mrc file.", error=True)
            return False
        try:
            self.set_volume(volume)
        except SamliverError as err:
            self.message(str(err), error=True)
            return False
        return True

    def set_volume(self, volume) -> None:
        import ipywidgets as widgets

        from .widgets import AnnotateWidget, SliceBrowser

        self.volume = volume
        self.prediction = None
        self.prediction_source = ""
        hu = volume.hu
        sp = "unknown (sizes in voxels)" if volume.spacing is None else f"{tuple(round(s, 2) for s in volume.spacing)} mm"
        self.summary.value = (f"<b>{Path(volume.source).name or 'volume'}</b>: shape {hu.shape} (z, y, x), "
                              f"HU {hu.min():.0f}..{hu.max():.0f}, spacing {sp}, "
                              f"{'with' if volume.label is not None else 'no'} reference label")
        self.browser = SliceBrowser(volume)
        self._overlay_options()
        self.browse_box.children = [widgets.HBox([self.overlay_choice]), self.overlay_note, self.browser.widget]
        self.annotator = AnnotateWidget(volume, self.model, config=self.config, background=self.background,
                                        out_dir=str(self.out_dir / "session"))
        self.annotator.on_trained.append(self._on_trained)
        self.annotator.on_saved.append(self._offer_session)
        self.seg_download = widgets.HTML("")
        self.segment_box.children = [self.annotator.widget, self.seg_download]
        self.burden_html.value = ""
        self.download.value = ""
        self.head_status.value = ""
        self.head_progress.layout.visibility = "hidden"
        self._show_viewer()
        self.message(f"loaded {Path(volume.source).name or 'volume'}: label it in <b>label a volume</b>, "
                     "browse it, or run a saved head in <b>whole volume</b>")

    # ---- what the browse tab and the viewer show
    def _overlay_options(self) -> None:
        opts = []
        if self.volume is not None and self.volume.label is not None:
            opts.append(("reference label", "reference"))
        if self.prediction is not None:
            opts.append(("head prediction", "prediction"))
        if not opts:
            opts = [("none", "none")]
        self.overlay_choice.options = opts
        self.overlay_choice.value = "prediction" if self.prediction is not None else opts[0][1]
        self.show_overlay(self.overlay_choice.value)

    def show_overlay(self, which: str) -> None:
        """Overlay the reference label or the head's prediction in the browse tab, and say which."""
        if self.browser is None:
            return
        if which == "prediction" and self.prediction is not None:
            self.browser.set_label(self.prediction, name="head prediction")
            self.overlay_note.value = (f"<b>Showing the head's prediction</b> ({self.prediction_source}), "
                                       "not the reference label.")
        elif which == "reference" and self.volume is not None and self.volume.label is not None:
            self.browser.set_label(self.volume.label, name="reference label")
            self.overlay_note.value = "Showing the <b>reference label</b> that came with the CT."
        else:
            self.browser.set_label(None)
            self.overlay_note.value = "No label to overlay yet: this CT came without one."

    def _show_viewer(self) -> None:
        from .viewer import VolumeViewer, show_volume

        if self.volume is None:
            return
        if isinstance(self.viewer, VolumeViewer):
            self.viewer.set_layer("prediction", self.prediction)
            if self.prediction is not None:
                self.viewer.message(f"prediction: {self.prediction_source}")
            return
        try:
            if self.prediction is None and self.volume.label is None and self.viewer_backend == "plotly":
                self.view3d_box.children = []
                return
            self.viewer = show_volume(self.volume, prediction=self.prediction, backend=self.viewer_backend,
                                      title="predicted liver and tumours" if self.prediction is not None else None)
        except SamliverError as err:
            self.viewer = None
            self.view3d_box.children = []
            if self.prediction is not None:
                self.message(str(err), error=True)
            return
        self.view3d_box.children = [getattr(self.viewer, "widget", self.viewer)]

    def _set_prediction(self, label: np.ndarray, source: str) -> None:
        from .io import save_label_nifti
        from .postprocess import format_burden, tumour_burden

        self.prediction = label
        self.prediction_source = source
        burden = tumour_burden(label, self.volume.spacing)
        self.burden_html.value = f"<b>tumour burden</b> ({source}): {format_burden(burden)}"
        out = save_label_nifti(label, self.volume, self.out_dir / "samliver_prediction.nii.gz")
        self.download.value = download_link_html(out, "download the predicted label (NIfTI)")
        self._overlay_options()
        if not hasattr(self.viewer, "set_layer"):  # plotly: a new figure per prediction
            self.viewer = None
        self._show_viewer()

    def _on_trained(self, widget) -> None:
        """After a training in the label tab: the exported label everywhere else."""
        if widget.session.prediction is None:
            return
        n = len(widget.session.confirmed)
        self._set_prediction(widget.session.export_label(),
                             f"head trained here on your {n} confirmed slices, with your slices as labelled")

    def _offer_session(self, widget) -> None:
        paths = widget.saved or {}
        links = [download_link_html(paths["label"], "download your label (NIfTI)")] if "label" in paths else []
        if "head" in paths:
            links.append(download_link_html(paths["head"], "download the head (checkpoint)"))
        self.seg_download.value = "<br>".join(links)

    # ---- whole volume with a saved head
    def run_head(self, head_path: str, *, slices: list[int] | None = None) -> np.ndarray | None:
        """Segment the whole volume with a saved head; show burden, viewer, download link.

        New slices are encoded first with a progress bar and the measured seconds per slice
        (no guessed duration). ``slices`` limits the prediction (default all; in FAST mode 16
        slices around the middle).
        """
        import time

        from .checkpoints import load_head_checked
        from .embeddings import embed_volume, open_embeddings
        from .inference import predict_volume

        if self.volume is None:
            self.message("Load a CT first.", error=True)
            return None
        path = user_path(head_path) if head_path else None
        if path is None or not path.is_file():
            self.message(f"Head checkpoint {head_path!r} not found (looked for {path}): train one in "
                         "<b>label a volume</b>, with `samliver demo` (writes outputs/head.pt in the folder you "
                         "run it from, so start `samliver app` there) or `samliver train`, then give its path.",
                         error=True)
            return None
        self.b_head.disabled = True
        bar, note = self.head_progress, self.head_status
        bar.layout.visibility = "visible"
        bar.bar_style = "info"
        t0 = time.perf_counter()
        try:
            head = load_head_checked(path, self.model)
            depth = self.volume.hu.shape[0]
            if slices is None and fast_mode():
                slices = list(range(max(0, depth // 2 - 8), min(depth, depth // 2 + 8)))
            zs = list(range(depth)) if slices is None else sorted(int(z) for z in slices)
            window = (getattr(head, "checkpoint_info", None) or {}).get("window") or DEFAULT_WINDOW
            have = set(open_embeddings(self.volume, self.model, window=window).available())
            todo = [z for z in zs if z not in have]
            bar.max, bar.value = max(1, len(todo)), 0
            note.value = f"encoding {len(todo)} new slices (once; cached): 0/{len(todo)}"

            def on_batch(n: int) -> None:  # the measured rate, not a guessed duration
                bar.value = done = min(len(todo), bar.value + n)
                rate = (time.perf_counter() - t0) / done
                note.value = (f"encoding {len(todo)} new slices (once; cached): {done}/{len(todo)}, "
                              f"{rate:.1f} s per slice so far, about {rate * (len(todo) - done):.0f} s left")

            if todo:
                embed_volume(self.volume, self.model, slices=todo, window=window, progress=False,
                             on_batch=on_batch)
            note.value = f"segmenting {len(zs)} slices with the head ..."
            emb = open_embeddings(self.volume, self.model, window=window)
            # predict_volume post-processes only the predicted slices: a FAST subset is never cut
            # into slabs by the empty slices between them
            label = predict_volume(self.volume, self.model, head, embeddings=emb, slices=slices, progress=False)
        except SamliverError as err:
            bar.bar_style = "danger"
            self.message(str(err), error=True)
            return None
        except Exception as err:  # noqa: BLE001
            bar.bar_style = "danger"
            self.message(f"The head could not be run ({type(err).__name__}: {err}).", error=True)
            return None
        finally:
            self.b_head.disabled = False
        seconds = time.perf_counter() - t0
        bar.bar_style, bar.value = "success", bar.max
        note.value = (f"segmented {len(zs)} slices in {seconds:.1f} s "
                      f"({len(todo)} newly encoded, {len(zs) - len(todo)} from the cache)")
        self._set_prediction(label, f"saved head {path.name}")
        self.message(f"segmented {len(zs)} slices with {path.name}: see the burden and the viewer; the browse "
                     "tab now overlays this prediction (switch back to the reference there)")
        return label

    def save_segmentation(self) -> dict | None:
        """Save the label tab's session (label NIfTI, head, log) and offer the downloads."""
        if self.annotator is None:
            self.message("Load a CT first.", error=True)
            return None
        return self.annotator.save_session(str(self.out_dir / "session"))


def build_app(**kwargs) -> App:
    """Create the app and display it (the served notebook calls this)."""
    from IPython.display import display

    app = App(**kwargs)
    display(app.widget)
    return app


def voila_command(port: int = 8866, ip: str = "127.0.0.1", notebook: str | os.PathLike | None = None) -> list[str]:
    """The command line that serves the app notebook with Voila."""
    nb = Path(notebook) if notebook else notebook_path()
    # port_retries=0: fail on a taken port rather than serve on another one than we print
    return [sys.executable, "-m", "voila", str(nb), f"--port={port}", "--Voila.port_retries=0",
            "--no-browser", f"--Voila.ip={ip}", "--theme=light"]


def main(argv: list[str] | None = None) -> int:
    """``samliver app [--port P] [--ip IP]``: serve the front end with Voila."""
    p = argparse.ArgumentParser(prog="samliver app", description=main.__doc__)
    p.add_argument("--port", type=int, default=8866, help="port (default 8866)")
    p.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--print-command", action="store_true", help="print the voila command and exit")
    args = p.parse_args(argv)
    nb = notebook_path()
    if not nb.is_file():
        raise SamliverError(f"The app notebook {nb} is missing: reinstall samliver.")
    if shutil.which("voila") is None:
        try:
            import voila  # noqa: F401
        except ImportError as err:
            raise SamliverError("Voila is not installed: `pip install 'samliver[ui]'`.") from err
    from .util import check_number

    check_number("--port", args.port, minimum=1, maximum=65535)
    cmd = voila_command(args.port, args.ip)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    # Voila would silently move to the next free port, and the URL printed here would be wrong.
    if not port_free(args.ip, args.port):
        raise SamliverError(f"Port {args.port} on {args.ip} is already in use (another samliver app?). "
                            f"Stop that server or choose another port with --port {args.port + 1}.")
    print(f"samliver app: serving on http://{args.ip}:{args.port}/ (Ctrl-C to stop)")
    env = {**os.environ, CWD_ENV: os.environ.get(CWD_ENV) or os.getcwd()}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
