"""The Voila front end: ``samliver app [--port P]``.

Choose the sample case, a path or an uploaded file; browse it; segment with a box or clicks;
run a trained head on the whole volume; see the tumour burden and the 3D view; download the
label as NIfTI. The served notebook (``samliver/app_notebook.ipynb``, package data) only calls
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

    model_name: SAM model for segmenting and heads (default ``"litemedsam"``); model: an
    already loaded ``SamModel`` (tests pass the tiny one). head_path: default head checkpoint
    (``outputs/head.pt``, written by ``samliver demo``). out_dir: where labels are written.
    """

    def __init__(self, *, model_name: str = "litemedsam", model: Any = None,
                 head_path: str = DEFAULT_HEAD, out_dir: str | None = None) -> None:
        import ipywidgets as widgets

        self.model_name = model_name
        self._model = model
        self.volume = None
        self.prediction: np.ndarray | None = None
        self.browser = None
        self.segmenter = None
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="samliver_app_"))
        self.source_dd = widgets.ToggleButtons(options=["sample", "path", "upload"], value="sample",
                                               description="CT from")
        self.path_text = widgets.Text(placeholder="/path/to/ct.nii.gz or DICOM folder", description="path",
                                      layout=widgets.Layout(width="420px"))
        self.upload = widgets.FileUpload(accept=".nii,.gz,.mrc", multiple=False, description="upload")
        self.b_load = widgets.Button(description="load", button_style="primary", icon="folder-open")
        self.head_text = widgets.Text(value=head_path, description="head", layout=widgets.Layout(width="420px"))
        self.b_head = widgets.Button(description="run head on volume", button_style="warning")
        self.status = widgets.HTML("Choose a CT and press <b>load</b>.")
        self.summary = widgets.HTML("")
        self.burden_html = widgets.HTML("")
        self.download = widgets.HTML("")
        self.browse_box = widgets.VBox([])
        self.segment_box = widgets.VBox([])
        self.view3d_box = widgets.VBox([])
        self.b_load.on_click(lambda _: self.load_from_ui())
        self.b_head.on_click(lambda _: self.run_head(self.head_text.value))
        tabs = widgets.Tab(children=[self.browse_box, self.segment_box,
                                     widgets.VBox([widgets.HBox([self.head_text, self.b_head]),
                                                   self.burden_html, self.download, self.view3d_box])])
        for i, title in enumerate(["browse", "segment (box / click)", "whole volume (head)"]):
            tabs.set_title(i, title)
        self.tabs = tabs
        self.widget = widgets.VBox([
            widgets.HTML("<h2>samliver: liver and tumour segmentation with SAM</h2>"
                         "<p>Choose a CT (the sample case, a path or an upload) and press <b>load</b>; browse it, "
                         "drag a box to segment, or run a trained head on the whole volume for the tumour burden, "
                         "the 3D view and a NIfTI download.</p>"),
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
        self.set_volume(volume)
        return True

    def set_volume(self, volume) -> None:
        import ipywidgets as widgets

        from .widgets import SegmentWidget, SliceBrowser

        self.volume = volume
        self.prediction = None
        hu = volume.hu
        sp = "unknown (sizes in voxels)" if volume.spacing is None else f"{tuple(round(s, 2) for s in volume.spacing)} mm"
        self.summary.value = (f"<b>{Path(volume.source).name or 'volume'}</b>: shape {hu.shape} (z, y, x), "
                              f"HU {hu.min():.0f}..{hu.max():.0f}, spacing {sp}, "
                              f"{'with' if volume.label is not None else 'no'} reference label")
        self.browser = SliceBrowser(volume)
        self.browse_box.children = [self.browser.widget]
        self.segmenter = SegmentWidget(volume, self.model, out_path=str(self.out_dir / "samliver_label.nii.gz"))
        self.seg_download = widgets.HTML("")
        # runs after the widget's own save handler: offer the saved file for download
        self.segmenter.b_save.on_click(lambda _: self._offer_segmentation())
        self.segment_box.children = [self.segmenter.widget, self.seg_download]
        self.burden_html.value = ""
        self.download.value = ""
        self.view3d_box.children = []
        self.message(f"loaded {Path(volume.source).name or 'volume'}: browse it, segment with a box, "
                     "or run a head on the whole volume")

    # ---- whole volume
    def run_head(self, head_path: str, *, slices: list[int] | None = None) -> np.ndarray | None:
        """Segment the whole volume with a trained head; show burden, 3D view, download link.

        ``slices`` limits the prediction (default all; in FAST mode 16 slices around the middle).
        """
        from .checkpoints import load_head_checked
        from .inference import predict_volume
        from .postprocess import format_burden, tumour_burden
        from .io import save_label_nifti

        if self.volume is None:
            self.message("Load a CT first.", error=True)
            return None
        path = user_path(head_path) if head_path else None
        if path is None or not path.is_file():
            self.message(f"Head checkpoint {head_path!r} not found (looked for {path}): train one with "
                         "`samliver demo` (writes outputs/head.pt in the folder you run it from, so "
                         "start `samliver app` there) or `samliver train`, then give its path.",
                         error=True)
            return None
        try:
            head = load_head_checked(path, self.model)
            depth = self.volume.hu.shape[0]
            if slices is None and fast_mode():
                slices = list(range(max(0, depth // 2 - 8), min(depth, depth // 2 + 8)))
            n = depth if slices is None else len(slices)
            self.message(f"encoding and segmenting {n} slices (about {1.2 * n:.0f} s on a CPU for new slices) ...")
            # predict_volume post-processes only the predicted slices: a FAST subset is never cut
            # into slabs by the empty slices between them
            label = predict_volume(self.volume, self.model, head, slices=slices, progress=False)
        except SamliverError as err:
            self.message(str(err), error=True)
            return None
        except Exception as err:  # noqa: BLE001
            self.message(f"The head could not be run ({type(err).__name__}: {err}).", error=True)
            return None
        self.prediction = label
        burden = tumour_burden(label, self.volume.spacing)
        self.burden_html.value = f"<b>tumour burden:</b> {format_burden(burden)}"
        out = save_label_nifti(label, self.volume, self.out_dir / "samliver_prediction.nii.gz")
        self.download.value = download_link_html(out, "download the predicted label (NIfTI)")
        if self.browser is not None:
            self.browser.set_label(label)
        try:
            from .view3d import view_3d

            self.view3d_box.children = [view_3d(label, self.volume.spacing)]
        except SamliverError as err:
            self.message(str(err), error=True)
        self.message(f"segmented {n} slices with {path.name}: see the burden, the 3D view and the browse tab")
        return label

    def _offer_segmentation(self) -> None:
        path = Path(self.segmenter.path_text.value)
        if path.is_file():
            self.seg_download.value = download_link_html(path, "download the interactive label (NIfTI)")

    def save_segmentation(self) -> Path | None:
        """Save the interactive label and offer it for download."""
        if self.segmenter is None:
            self.message("Load a CT first.", error=True)
            return None
        out = self.segmenter.save(self.segmenter.path_text.value)
        if out is not None:
            self.seg_download.value = download_link_html(out, "download the interactive label (NIfTI)")
        return out


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
