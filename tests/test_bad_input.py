"""The fault matrix: bad input to every command and the library, and what samliver guarantees.

Every CLI case runs ``samliver <command> ...`` in-process through :func:`samliver.cli.main` and
asserts: exit code 2, exactly one stderr line ``samliver <command>: error: ...`` that names the
problem (``words``) and says what to do (``hint``), no traceback, and that no file that
existed before the command changed (SHA-256 of every file under the test folder). Library
cases assert the same for the :class:`SamliverError` message, or, for cache faults, that the
fault is repaired (recomputed) and never used.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from samliver import cli
from samliver.io import load_volume, save_volume_nifti
from samliver.phantom import make_phantom
from samliver.util import SamliverError, sha256_file

# ---------------------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _unchanged(before: dict[str, str]) -> list[str]:
    """Pre-existing files that were changed or removed."""
    return [p for p, digest in before.items() if not Path(p).is_file() or sha256_file(p) != digest]


def refused(capsys, root: Path, argv: list[str], words: tuple[str, ...], hint: tuple[str, ...] = ()):
    """Run a command expected to refuse; check the fault-matrix guarantees; return stderr."""
    capsys.readouterr()
    before = _snapshot(root)
    rc = cli.main(argv)
    out = capsys.readouterr()
    err = out.err.strip()
    assert rc == 2, (rc, out.out, err)
    assert "Traceback" not in out.err + out.out
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"samliver {argv[0]}: error: "), err
    for word in words + hint:
        assert word.lower() in err.lower(), (word, err)
    assert _unchanged(before) == [], err
    return err


@pytest.fixture(scope="module")
def tiny():
    from samliver.models import get_model

    with pytest.warns(UserWarning):
        return get_model("tiny", device="cpu")


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A private cache ($SAMLIVER_HOME) so cache faults never touch the shared one."""
    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


@pytest.fixture()
def ct(tmp_path):
    """A small phantom as NIfTI (2.5 x 0.8 x 0.8 mm) with its label file."""
    vol = make_phantom((8, 40, 40), n_lesions=1, seed=3)
    img = save_volume_nifti(vol.hu, tmp_path / "ct.nii.gz", spacing=(2.5, 0.8, 0.8))
    lab = save_volume_nifti(vol.label, tmp_path / "ct_label.nii.gz", spacing=(2.5, 0.8, 0.8), label=True)
    return img, lab


@pytest.fixture()
def head(tmp_path, tiny):
    from samliver.checkpoints import save_checkpoint
    from samliver.heads import build_head
    from samliver.training import TrainConfig

    return save_checkpoint(tmp_path / "head.pt", build_head("cnn", model=tiny), config=TrainConfig(kind="cnn"),
                           model_info={"model_name": "tiny", "weights_id": tiny.weights_id})


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


# ---------------------------------------------------------------------------------------
# files of each format: missing, truncated, mislabelled, wrong dimensions, bad values
# ---------------------------------------------------------------------------------------
def _truncated(tmp_path, ct):
    path = tmp_path / "trunc.nii.gz"
    path.write_bytes(ct[0].read_bytes()[:300])
    return [str(path)]


def _text_as_nifti(tmp_path, ct):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image")
    return [str(path)]


def _mrc_truncated(tmp_path, ct):
    path = tmp_path / "vol.mrc"
    path.write_bytes(b"\0" * 100)
    return [str(path)]


def _png(tmp_path, ct):
    (tmp_path / "ct.png").write_bytes(b"\x89PNG")
    return [str(tmp_path / "ct.png")]


def _singular(tmp_path, ct):
    """A .nii whose s-form (the affine a reader uses) is all zeros, written byte by byte."""
    import struct

    path = _nifti(tmp_path / "flat.nii", np.zeros((8, 8, 4), np.float32))
    raw = bytearray(path.read_bytes())
    raw[252:256] = struct.pack("<hh", 0, 1)  # qform_code 0, sform_code 1
    raw[280:328] = bytes(48)  # srow_x, srow_y, srow_z
    path.write_bytes(bytes(raw))
    return [str(path)]


FILE_CASES = {
    "missing file": (lambda t, c: [str(t / "nope.nii.gz")], ("does not exist",), ("check the path",)),
    "truncated nifti": (_truncated, ("not a readable nifti",), ("again",)),
    "text file named .nii.gz": (_text_as_nifti, ("not a readable nifti",), ("again",)),
    "unsupported type": (_png, ("unsupported file type",), ("nifti",)),
    "truncated mrc": (_mrc_truncated, ("not a readable mrc",), ("again",)),
    "4-D nifti": (lambda t, c: [str(_nifti(t / "4d.nii.gz", np.zeros((8, 8, 4, 2), np.float32)))],
                  ("4-d data",), ("single 3d scan",)),
    "2-D nifti": (lambda t, c: [str(_nifti(t / "2d.nii.gz", np.zeros((8, 8), np.float32)))],
                  ("2-d data",), ("3d",)),
    "NaN in the CT": (lambda t, c: [str(_nifti(t / "nan.nii.gz", np.full((8, 8, 4), np.nan, np.float32)))],
                      ("nan",), ("check the export",)),
    "values far beyond HU (3e38)": (lambda t, c: [str(_nifti(t / "big.nii.gz", np.full((8, 8, 4), 3e38, np.float32)))],
                                   ("outside the hounsfield range",), ("convert it to hu",)),
    "singular affine": (_singular, ("invalid affine",), ("fix its header",)),
    "label of another shape": (lambda t, c: [str(c[0]), "--label",
                                             str(_nifti(t / "l.nii.gz", np.zeros((8, 8, 4), np.uint8)))],
                               ("has shape",), ("pass the label that belongs",)),
    "label values outside 0/1/2": (lambda t, c: [str(c[0]), "--label", str(_nifti(
        t / "l5.nii.gz", np.full((40, 40, 8), 5, np.uint8), np.diag([-0.8, -0.8, -2.5, 1.0])))],
        ("outside {0, 1, 2}",), ("remap",)),
    "non-integer label": (lambda t, c: [str(c[0]), "--label", str(_nifti(
        t / "lf.nii.gz", np.full((40, 40, 8), 0.5, np.float32), np.diag([-0.8, -0.8, -2.5, 1.0])))],
        ("non-integer",), ("0 (background)",)),
    "label of another geometry": (lambda t, c: [str(c[0]), "--label", str(_nifti(
        t / "lg.nii.gz", np.zeros((40, 40, 8), np.uint8), np.diag([-0.9, -0.8, -2.5, 1.0])))],
        ("different geometry",), ("pass the label",)),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_file_faults(case, tmp_path, ct, capsys):
    make, words, hint = FILE_CASES[case]
    refused(capsys, tmp_path, ["info", *make(tmp_path, ct)], words, hint)


# ---------------------------------------------------------------------------------------
# DICOM series defects
# ---------------------------------------------------------------------------------------
def _series(folder: Path, n: int = 6, *, step: float = 2.5, positions=None, uid=None, size=(16, 16),
            drop_tag: str | None = None, tilt: float = 0.0, iop=(1, 0, 0, 0, 1, 0), prefix: str = "") -> str:
    """Write an axial series; ``positions`` (mm along z) override the regular ``step``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    zs = positions if positions is not None else [i * step for i in range(n)]
    shapes = size if isinstance(size, list) else [size] * len(zs)
    for i, (z, shape) in enumerate(zip(zs, shapes)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = uid, "CT"
        ds.Rows, ds.Columns = shape
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = step
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = [0.0, tilt * i, -float(z)]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = np.full(shape, 1000 + i, np.uint16).tobytes()
        if drop_tag:
            delattr(ds, drop_tag)
        ds.save_as(str(folder / f"{prefix}{uid[-6:]}_{i:03d}.dcm"), enforce_file_format=True)
    return uid


def test_dicom_regular_series_has_the_right_spacing(tmp_path):
    _series(tmp_path / "ok")
    vol = load_volume(tmp_path / "ok")
    assert vol.shape == (6, 16, 16) and np.allclose(vol.spacing, (2.5, 0.8, 0.8))


def _gap(folder):
    _series(folder, positions=[0, 2.5, 5.0, 10.0, 12.5])  # the file at 7.5 mm is missing


DICOM_CASES = {
    "missing slice (gap)": (_gap, ("uneven slice spacing", "5.000 mm"), ("complete series",)),
    "duplicate position": (lambda f: _series(f, positions=[0, 2.5, 2.5, 5.0]), ("same position",),
                           ("keep one file",)),
    "varying thickness": (lambda f: _series(f, positions=[0, 2.5, 5.0, 10.0, 15.0, 20.0]),
                          ("uneven slice spacing",), ("resample",)),
    "gantry tilt": (lambda f: _series(f, tilt=1.0), ("gantry tilt",), ("correct the tilt",)),
    "no PixelSpacing": (lambda f: _series(f, drop_tag="PixelSpacing"), ("pixelspacing",), ("re-export",)),
    "two series": (lambda f: (_series(f, uid="1.2.3.4"), _series(f, uid="1.2.3.5")),
                   ("2 dicom series", "1.2.3.4"), ("--series-uid",)),
    "mixed slice sizes": (lambda f: _series(f, n=3, size=[(16, 16), (16, 16), (12, 16)]),
                          ("differ in size",), ("export one series",)),
    "mixed orientations": (lambda f: (_series(f, n=3, uid="1.2.9"),
                                      _series(f, positions=[20.0], uid="1.2.9", iop=(0, 1, 0, 1, 0, 0), prefix="b")),
                           ("mixes slice orientations",), ("single orientation",)),
    "no DICOM in the folder": (lambda f: (f.mkdir(), (f / "a.txt").write_text("x")),
                               ("no dicom image slices",), ("point samliver",)),
}


@pytest.mark.parametrize("case", list(DICOM_CASES))
def test_dicom_faults(case, tmp_path, capsys):
    make, words, hint = DICOM_CASES[case]
    make(tmp_path / "series")
    refused(capsys, tmp_path, ["info", str(tmp_path / "series")], words, hint)


def test_dicom_unknown_series_uid(tmp_path, capsys):
    _series(tmp_path / "s", uid="1.2.3.4")
    refused(capsys, tmp_path, ["info", str(tmp_path / "s"), "--series-uid", "9.9"], ("is not in",),
            ("--series-uid",))


def test_dcm_file_selects_its_series_and_every_command_takes_series_uid(tmp_path, home, capsys):
    folder = tmp_path / "two"
    _series(folder, uid="1.2.3.4")
    _series(folder, n=4, uid="1.2.3.5")
    one = sorted(folder.glob("*.dcm"))[-1]  # a file of the 4-slice series (names sort by uid)
    assert load_volume(one).shape == (4, 16, 16)
    assert load_volume(folder, series_uid="1.2.3.4").shape == (6, 16, 16)
    # every command that reads a volume accepts --series-uid (argparse would exit 2 otherwise):
    # it gets as far as the volume, whose series is then found and read.
    for argv in (["embed", str(folder), "--model", "tiny", "--series-uid", "1.2.3.4"],
                 ["segment", str(folder), "--slice", "0", "--box", "1", "1", "8", "8", "--model", "tiny",
                  "-o", str(tmp_path / "m.nii.gz"), "--series-uid", "1.2.3.4"]):
        with pytest.warns(UserWarning):
            assert cli.main(argv) == 0, capsys.readouterr().err
    for name in ("predict", "train", "zero-shot", "experiment"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        assert "--series-uid" in capsys.readouterr().out, name


# ---------------------------------------------------------------------------------------
# prompts, slice ranges and numeric options (all refused before any volume is encoded)
# ---------------------------------------------------------------------------------------
OPTION_CASES = {
    "segment: no prompt": (["segment", "{ct}", "--slice", "1"], ("give a prompt",), ("--box",)),
    "segment: slice outside": (["segment", "{ct}", "--slice", "99", "--box", "1", "1", "9", "9"],
                               ("outside the volume",), ()),
    "segment: unknown window": (["segment", "{ct}", "--slice", "1", "--box", "1", "1", "9", "9",
                                 "--window", "brain"], ("unknown",), ("lo,hi",)),
    "segment: non-finite box": (["segment", "{ct}", "--slice", "1", "--box", "nan", "1", "9", "9"],
                                ("non-finite",), ("pixel coordinates",)),
    "embed: backwards range": (["embed", "{ct}", "--slices", "5-3"], ("runs backwards",), ("3-5",)),
    "embed: unreadable range": (["embed", "{ct}", "--slices", "a-b"], ("cannot read slice list",),
                                ("72-127",)),
    "embed: range outside": (["embed", "{ct}", "--slices", "4-30"], ("outside the volume",), ()),
    "embed: window foo,bar": (["embed", "{ct}", "--window", "foo,bar"], ("not lo,hi",), ("-160,240",)),
    "embed: window hi below lo": (["embed", "{ct}", "--window=240,-160"], ("hi > lo",), ()),
    "embed: batch size 0": (["embed", "{ct}", "--batch-size", "0"], ("--batch-size", "at least 1"), ()),
    "train: steps 0": (["train", "{ct}", "--label", "{label}", "--steps", "0"], ("--steps", "at least 1"), ()),
    "train: steps -5": (["train", "{ct}", "--label", "{label}", "--steps", "-5"], ("--steps",), ()),
    "train: lr -1": (["train", "{ct}", "--label", "{label}", "--lr", "-1"], ("--lr", "greater than 0"), ()),
    "train: lr nan": (["train", "{ct}", "--label", "{label}", "--lr", "nan"], ("--lr", "finite"), ()),
    "train: k 0": (["train", "{ct}", "--label", "{label}", "--k", "0"], ("--k", "at least 1"), ()),
    "train: views -1": (["train", "{ct}", "--label", "{label}", "--views", "-1"], ("--views",), ()),
    "train: backwards slice range": (["train", "{ct}", "--label", "{label}", "--train-slices", "5-3"],
                                     ("runs backwards",), ("low-high",)),
    "train: no label": (["train", "{ct}"], ("has no label",), ("--label",)),
    "predict: negative lesion size": (["predict", "{ct}", "--head", "{head}", "--min-lesion-size", "-1"],
                                      ("--min-lesion-size",), ()),
    "zero-shot: clicks 0": (["zero-shot", "{ct}", "--label", "{label}", "--clicks", "0"], ("--clicks",), ()),
    "experiment: steps 0": (["experiment", "{ct}", "--label", "{label}", "--steps", "0"], ("--steps",), ()),
    "sample with --series-uid": (["embed", "sample", "--series-uid", "1.2"], ("sample case",), ("drop",)),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_option_faults(case, tmp_path, home, ct, head, capsys):
    argv, words, hint = OPTION_CASES[case]
    subst = {"{ct}": str(ct[0]), "{label}": str(ct[1]), "{head}": str(head)}
    refused(capsys, tmp_path, [subst.get(a, a) for a in argv], words, hint)
    assert not (home / "embeddings").exists() or not list((home / "embeddings").rglob("*.npy"))


def test_segment_accepts_the_window_its_error_suggests(tmp_path, home, ct, capsys):
    with pytest.warns(UserWarning):
        assert cli.main(["segment", str(ct[0]), "--slice", "2", "--box", "5", "5", "30", "30", "--model",
                         "tiny", "--window=-160,240", "-o", str(tmp_path / "m.nii.gz")]) == 0


def test_embed_counts_computed_not_requested_slices(tmp_path, home, ct, capsys):
    with pytest.warns(UserWarning):
        assert cli.main(["embed", str(ct[0]), "--model", "tiny", "--slices", "0-2"]) == 0
        assert capsys.readouterr().out.startswith("3 slices embedded, 0 reused")
        assert cli.main(["embed", str(ct[0]), "--model", "tiny", "--slices", "1-4"]) == 0
        assert capsys.readouterr().out.startswith("2 slices embedded, 2 reused")


# ---------------------------------------------------------------------------------------
# checkpoints: corrupt, foreign, mismatched kind, another model
# ---------------------------------------------------------------------------------------
def _mismatched_kind(tmp_path, head_path):
    import torch

    ckpt = torch.load(head_path, weights_only=False)
    ckpt["head_kind"] = "linear"  # a cnn head's weights labelled as a linear head
    torch.save(ckpt, tmp_path / "mixed.pt")
    return tmp_path / "mixed.pt"


def _foreign(tmp_path, head_path):
    import torch

    torch.save({"model": {"w": torch.zeros(3)}}, tmp_path / "foreign.pt")
    return tmp_path / "foreign.pt"


def _other_model(tmp_path, head_path):
    from samliver.checkpoints import save_checkpoint
    from samliver.heads import build_head
    from samliver.training import TrainConfig

    return save_checkpoint(tmp_path / "other.pt", build_head("cnn", embed_dim=64), config=TrainConfig(kind="cnn"),
                           model_info={"model_name": "tiny"})


CHECKPOINT_CASES = {
    "corrupt bytes": (lambda t, h: (t / "bad.pt", (t / "bad.pt").write_bytes(os.urandom(512)))[0],
                      ("not a readable head checkpoint",), ("samliver train",)),
    "missing": (lambda t, h: t / "none.pt", ("not found",), ("samliver train",)),
    "foreign torch file": (_foreign, ("not a samliver head checkpoint",), ("samliver train",)),
    "kind does not match weights": (_mismatched_kind, ("does not match its own head kind",), ("retrain",)),
    "trained for another model": (_other_model, ("embeddings of shape",), ("retrain",)),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint_faults(case, tmp_path, home, ct, head, capsys):
    make, words, hint = CHECKPOINT_CASES[case]
    bad = make(tmp_path, head)
    with pytest.warns(UserWarning) if case in ("kind does not match weights", "trained for another model") \
            else _no_warning():
        refused(capsys, tmp_path, ["predict", str(ct[0]), "--head", str(bad), "-o", str(tmp_path / "o.nii.gz")],
                words, hint)
    assert not (tmp_path / "o.nii.gz").exists()


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------
# outputs: never over an input, never over an existing file without --overwrite,
# read-only and impossible folders refused before the work
# ---------------------------------------------------------------------------------------
OUTPUT_CASES = {
    "predict -o the input CT": (["predict", "{ct}", "--head", "{head}", "-o", "{ct}"], ("is an input",), ("another output",)),
    "predict -o the input CT with --overwrite": (["predict", "{ct}", "--head", "{head}", "-o", "{ct}", "--overwrite"],
                                                 ("is an input",), ()),
    "segment -o the input CT": (["segment", "{ct}", "--slice", "1", "--box", "1", "1", "9", "9", "-o", "{ct}",
                                 "--overwrite"], ("is an input",), ()),
    "predict over an existing result": (["predict", "{ct}", "--head", "{head}", "-o", "{old}"],
                                        ("already exists",), ("--overwrite",)),
    "predict default output exists": (["predict", "{ct}", "--head", "{head}"], ("already exists",), ("--overwrite",)),
    "segment over an existing mask": (["segment", "{ct}", "--slice", "1", "--box", "1", "1", "9", "9", "-o", "{old}"],
                                      ("already exists",), ("--overwrite",)),
    "segment --png over the input": (["segment", "{ct}", "--slice", "1", "--box", "1", "1", "9", "9", "-o",
                                      "{new}", "--png", "{ct}", "--overwrite"], ("is an input",), ()),
    "train -o the input CT": (["train", "{ct}", "--label", "{label}", "-o", "{ct}"], ("is an input",), ()),
    "predict into a read-only location": (["predict", "{ct}", "--head", "{head}", "-o", "/proc/samliver.nii.gz"],
                                          ("not writable",), ("writable location",)),
    "segment --png into a read-only location": (["segment", "{ct}", "--slice", "1", "--box", "1", "1", "9", "9",
                                                 "-o", "{new}", "--png", "/proc/x.png"], ("not writable",), ()),
    "train -o into a read-only location": (["train", "{ct}", "--label", "{label}", "-o", "/proc/head.pt"],
                                           ("not writable",), ()),
    "output under a file (folder cannot be made)": (["predict", "{ct}", "--head", "{head}", "-o", "{old}/x.nii.gz"],
                                                    ("cannot create the folder",), ("writable location",)),
}


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="uses /proc as a read-only location")
@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_output_faults(case, tmp_path, home, ct, head, capsys):
    old = tmp_path / "result.nii.gz"
    old.write_bytes(b"a result the user keeps")
    (tmp_path / "ct_samliver.nii.gz").write_bytes(b"an earlier default output")
    argv, words, hint = OUTPUT_CASES[case]
    subst = {"{ct}": str(ct[0]), "{label}": str(ct[1]), "{head}": str(head), "{old}": str(old),
             "{new}": str(tmp_path / "new.nii.gz")}
    refused(capsys, tmp_path, [a.replace("{old}", str(old)) if "{old}/" in a else subst.get(a, a) for a in argv],
            words, hint)
    assert not (tmp_path / "new.nii.gz").exists()  # nothing half-done: no mask without its PNG


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_by_permissions(tmp_path, home, ct, head, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(capsys, tmp_path, ["predict", str(ct[0]), "--head", str(head), "-o", str(ro / "m.nii.gz")],
                ("not writable",), ())
    finally:
        ro.chmod(0o700)


def test_predict_default_output_is_beside_the_volume(tmp_path, home, head, capsys):
    vol = make_phantom((8, 32, 32), n_lesions=1, seed=4)
    paths = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        src = save_volume_nifti(vol.hu, tmp_path / sub / "ct.nii.gz", spacing=(2.5, 0.8, 0.8))
        with pytest.warns(UserWarning):
            assert cli.main(["predict", str(src), "--head", str(head), "--json"]) == 0
        paths.append(json.loads(capsys.readouterr().out)["output"])
    assert paths == [str(tmp_path / "a" / "ct_samliver.nii.gz"), str(tmp_path / "b" / "ct_samliver.nii.gz")]
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------
# the embedding cache: corrupt bodies, truncation, missing checksums, concurrency, kill -9
# ---------------------------------------------------------------------------------------
def _fresh(vol, tiny, root, zs=(0, 1, 2)):
    from samliver.embeddings import embed_volume

    return embed_volume(vol, tiny, slices=list(zs), progress=False, cache_root=root)


CACHE_FAULTS = {
    "NaN body, valid header": lambda p: np.save(p, np.full((256, 64, 64), np.nan, np.float16)),
    "zero body, valid header": lambda p: np.save(p, np.zeros((256, 64, 64), np.float16)),
    "another slice's body": lambda p: np.save(p, np.asarray(np.load(p.with_name("z0002.npy")))),
    "truncated file": lambda p: p.write_bytes(p.read_bytes()[:1000]),
    "checksum file missing": lambda p: p.with_suffix(".crc32").unlink(),
    "wrong dtype": lambda p: np.save(p, np.zeros((256, 64, 64), np.float32)),
}


@pytest.mark.parametrize("case", list(CACHE_FAULTS))
def test_cache_faults_are_recomputed_never_used(case, tmp_path, tiny):
    vol = make_phantom((8, 32, 32), n_lesions=1, seed=5)
    emb = _fresh(vol, tiny, tmp_path)
    good = np.array(emb[1])
    CACHE_FAULTS[case](emb.slice_path(1))
    assert 1 not in emb  # detected on read
    with pytest.raises(SamliverError, match="no valid cached embedding"):
        emb[1]
    again = _fresh(vol, tiny, tmp_path)
    assert np.array_equal(np.asarray(again[1]), good)


def test_non_finite_encoder_output_is_refused_and_not_cached(tmp_path, tiny, monkeypatch):
    import torch

    vol = make_phantom((8, 32, 32), n_lesions=1, seed=5)
    monkeypatch.setattr(tiny, "encode", lambda batch: torch.full((len(batch), 256, 64, 64), float("nan")))
    with pytest.raises(SamliverError, match="NaN or infinite.*nothing was cached"):
        _fresh(vol, tiny, tmp_path, zs=[0])
    assert not list(tmp_path.rglob("*.npy"))


def test_concurrent_writers_leave_valid_entries(tmp_path, tiny):
    from concurrent.futures import ThreadPoolExecutor

    vol = make_phantom((8, 32, 32), n_lesions=1, seed=6)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: _fresh(vol, tiny, tmp_path, zs=range(4)), range(3)))
    emb = results[0]
    assert all(z in emb for z in range(4))
    assert not [p for p in emb.path.iterdir() if p.name.startswith(".")]  # no temp files left


_EMBED_SCRIPT = """
import sys, time
import numpy as np
from samliver.embeddings import embed_volume
from samliver.models import get_model
from samliver.phantom import make_phantom
import warnings; warnings.simplefilter("ignore")
model = get_model("tiny", device="cpu")
real = model.encode
def slow(batch):
    out = real(batch)
    time.sleep(float(sys.argv[2]))
    return out
model.encode = slow
embed_volume(make_phantom((8, 32, 32), n_lesions=1, seed=7), model, batch_size=1, progress=False,
             cache_root=sys.argv[1])
print("done")
"""


def test_kill_9_during_embed_then_rerun(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _EMBED_SCRIPT, str(tmp_path), "0.5"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.rglob("z*.crc32"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(list(tmp_path.rglob("z*.npy"))) < 8
    rerun = subprocess.run([sys.executable, "-c", _EMBED_SCRIPT, str(tmp_path), "0"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and rerun.stdout.strip() == "done", rerun.stderr
    from samliver.embeddings import _read_slice

    files = sorted(tmp_path.rglob("z*.npy"))
    assert len(files) == 8 and all(_read_slice(p) is not None for p in files)


# ---------------------------------------------------------------------------------------
# the sample, the app, taken ports
# ---------------------------------------------------------------------------------------
def test_truncated_sample_nifti_is_repaired(tmp_path, monkeypatch):
    import shutil

    from samliver.sample import fetch_sample, sample_dir

    src = sample_dir()
    fetch_sample()  # make sure the shared copy (and its wheel) exist
    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path))
    (tmp_path / "sample").mkdir()
    for wheel in src.glob("*.whl"):  # only the wheel: the private sample is built from it, offline
        shutil.copy(wheel, tmp_path / "sample")
    info = fetch_sample()
    assert Path(info["image"]).parent == tmp_path / "sample"
    image = Path(info["image"])
    good = sha256_file(image)
    image.write_bytes(image.read_bytes()[:2000])
    info = fetch_sample()
    assert sha256_file(image) == good and info["nifti_sha256"]["image"] == good


def test_sample_load_error_names_force(tmp_path, monkeypatch):
    from samliver import sample

    monkeypatch.setattr(sample, "fetch_sample", lambda force=False: {
        "image": str(tmp_path / "gone.nii.gz"), "label": str(tmp_path / "gone.nii.gz"), "case_id": "x"})
    with pytest.raises(SamliverError, match="fetch-sample --force"):
        sample.load_sample()


def test_taken_port_is_refused(tmp_path, capsys):
    pytest.importorskip("voila")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        refused(capsys, tmp_path, ["app", "--port", str(port)], ("already in use",), (f"--port {port + 1}",))


def test_port_out_of_range(tmp_path, capsys):
    refused(capsys, tmp_path, ["app", "--port", "70000"], ("--port", "at most 65535"), ())


def test_app_keeps_unknown_spacing_of_an_upload(tmp_path, tiny):
    from samliver.app import App

    src = save_volume_nifti(make_phantom((8, 32, 32), n_lesions=1).hu, tmp_path / "up.nii.gz", spacing=None)
    app = App(model=tiny, out_dir=str(tmp_path / "app"))
    assert app.load_bytes("up.nii.gz", src.read_bytes())  # uploaded without its sidecar
    assert app.volume.spacing is None and "unknown" in app.summary.value


def test_app_head_path_resolves_where_samliver_app_started(tmp_path, home, tiny, monkeypatch, head):
    from samliver.app import App

    src = save_volume_nifti(make_phantom((8, 32, 32), n_lesions=1).hu, tmp_path / "v.nii.gz", spacing=(2, 1, 1))
    (tmp_path / "outputs").mkdir()
    Path(head).rename(tmp_path / "outputs" / "head.pt")
    monkeypatch.setenv("SAMLIVER_APP_CWD", str(tmp_path))
    monkeypatch.chdir("/")  # Voila runs the notebook elsewhere
    app = App(model=tiny, out_dir=str(tmp_path / "app"))
    assert app.load(str(src))
    assert app.run_head("outputs/head.pt") is not None, app.status.value


def test_unknown_command_is_one_line(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# results: subset prediction and the demo's export
# ---------------------------------------------------------------------------------------
def test_predicting_a_subset_never_lets_missing_slices_cut_the_liver(monkeypatch):
    from samliver import inference

    depth = 12
    volume = make_phantom((depth, 32, 32), n_lesions=1, seed=8)

    def liver_everywhere(volume, model, head, *, slices, **_):
        probs = np.zeros((len(slices), 3, 32, 32), np.float32)
        probs[:, 1, 8:24, 8:24] = 1.0
        probs[:, 0] = 1.0 - probs[:, 1]
        return slices, probs

    monkeypatch.setattr(inference, "predict_probabilities", liver_everywhere)
    every_other = list(range(0, depth, 2))
    label = inference.predict_volume(volume, None, None, slices=every_other)
    assert all(label[z].any() for z in every_other)  # each predicted slice keeps its liver
    assert not label[1::2].any()


def test_demo_export_keeps_the_users_labels(tmp_path, monkeypatch):
    import nibabel as nib

    from samliver import demo, inference

    vol = make_phantom((10, 32, 32), n_lesions=1, seed=9)
    train, test = [2, 6], [z for z in range(10) if z not in (2, 6)]
    ctx = demo.DemoContext(out_dir=tmp_path, volume=vol)
    ctx.results.update(split={"train": train, "test": test}, model=None, head=None, embeddings=None)
    monkeypatch.setattr(inference, "predict_volume", lambda *a, **k: vol.label.copy())
    demo.step_predict(ctx)
    # a non-NIfTI source is written as (x, y, z) data of the (z, y, x) label
    exported = np.asarray(nib.load(str(tmp_path / "prediction.nii.gz")).dataobj).transpose(2, 1, 0)
    assert np.array_equal(exported[train], vol.label[train])  # the user's labels, not empty slices
    assert not ctx.results["prediction"][train].any()  # what is scored stays the test slices


def test_predict_accepts_sample_like_embed_and_segment(tmp_path, monkeypatch, capsys):
    """``predict sample`` resolves the sample case (then stops here at a head for another model)."""
    from samliver.checkpoints import save_checkpoint
    from samliver.cli.predict import default_output
    from samliver.heads import build_head
    from samliver.training import TrainConfig

    monkeypatch.chdir(tmp_path)
    other = save_checkpoint(tmp_path / "other.pt", build_head("cnn", embed_dim=64), config=TrainConfig(kind="cnn"),
                            model_info={"model_name": "tiny"})
    with pytest.warns(UserWarning):
        err = refused(capsys, tmp_path, ["predict", "sample", "--head", str(other)], ("embeddings of shape",), ())
    assert "does not exist" not in err  # the old "sample does not exist"
    assert default_output("sample") == Path("outputs") / "sample_samliver.nii.gz"
