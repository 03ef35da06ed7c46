import hashlib
import http.server
import io as _io
import json
import tarfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samliver.datasets import (
    Case,
    download_msd_liver,
    index_dataset,
    index_lits,
    index_msd,
    index_pairs,
    liver_slices,
    protocol_split,
    select_label_slices,
    split_by_volume,
)
from samliver.download import download_file
from samliver.io import save_volume_nifti
from samliver.util import SamliverError


# ---------------------------------------------------------------------------------------
# slice splits
# ---------------------------------------------------------------------------------------
def test_protocols_on_the_sample(sample_volume):
    lab = sample_volume.label
    train, test = protocol_split(lab, "sparse", k=8)
    assert train == [4, 21, 38, 55, 72, 89, 106, 123]
    assert test == [z for z in range(128) if z not in train]
    train, test = protocol_split(lab, "slab", k=8)
    assert len(train) == 8 and all(z < 64 for z in train) and all((lab[z] >= 1).any() for z in train)
    assert test == list(range(72, 128))
    assert protocol_split(lab, "slab", k=32)[0] != train
    assert len(protocol_split(lab, "slab", k=32)[0]) == 32
    # one labelled slice: the middle one, not the edge of the liver
    assert protocol_split(lab, "sparse", k=1)[0] == [64]
    assert protocol_split(lab, "slab", k=1)[0] == [32]


def test_protocols_scale_to_depth(phantom):
    train, test = protocol_split(phantom.label, "sparse", k=4)  # depth 32
    assert train == [1, 11, 20, 31] or (len(train) == 4 and train[0] <= 2 and train[-1] >= 29)
    assert set(train).isdisjoint(test) and sorted(train + test) == list(range(32))
    train, test = protocol_split(phantom.label, "slab", k=3)
    assert all(z < 16 for z in train) and test == list(range(18, 32))


def test_protocol_errors(phantom):
    with pytest.raises(SamliverError, match="Unknown protocol"):
        protocol_split(phantom.label, "dense")
    with pytest.raises(SamliverError, match="only"):
        protocol_split(phantom.label, "slab", k=100)
    with pytest.raises(SamliverError):
        protocol_split(phantom.label[0], "sparse")


@pytest.mark.parametrize("protocol", ["slab-random", "sparse-random"])
def test_random_protocols_deterministic_disjoint_and_k_fits(sample_volume, protocol):
    lab = sample_volume.label
    liver = set(liver_slices(lab))
    draws = []
    for split in range(10):
        train, test = protocol_split(lab, protocol, k=8, split=split)
        assert (train, test) == protocol_split(lab, protocol, k=8, split=split)  # deterministic
        assert len(train) == 8 and set(train) <= liver and train == sorted(train)
        assert set(train).isdisjoint(test) and test == sorted(test) and test
        if protocol == "slab-random":
            # one contiguous test block, at least the gap away from every labelled slice
            assert test == list(range(test[0], test[-1] + 1))
            assert min(abs(a - b) for a in train for b in test) > 8
            # the blocks do not depend on K: K = 1 and K = 16 use the same test block
            assert protocol_split(lab, protocol, k=16, split=split)[1] == test
            assert len(protocol_split(lab, protocol, k=16, split=split)[0]) == 16
        else:
            assert sorted(train + test) == list(range(lab.shape[0]))
            gaps = np.diff(train)
            assert gaps.max() - gaps.min() <= 1  # still evenly spaced
        draws.append(tuple(train))
    assert len(set(draws)) >= 5  # the split seed moves the labelled slices
    # split is ignored by the fixed protocols
    assert protocol_split(lab, "slab", k=8, split=3) == protocol_split(lab, "slab", k=8)


def test_random_protocol_errors(sample_volume, phantom):
    with pytest.raises(SamliverError, match="k=100.*smaller K") as err:
        protocol_split(sample_volume.label, "slab-random", k=100, split=2)
    assert "\n" not in str(err.value)
    with pytest.raises(SamliverError, match="smaller K"):
        protocol_split(sample_volume.label, "sparse-random", k=200)
    with pytest.raises(SamliverError, match="split seed"):
        protocol_split(sample_volume.label, "sparse-random", k=2, split=-1)
    train, test = protocol_split(phantom.label, "slab-random", k=2, split=1)  # depth 32: gap 2
    assert len(train) == 2 and min(abs(a - b) for a in train for b in test) > 2
    empty = np.zeros((8, 4, 4), np.uint8)
    with pytest.raises(SamliverError, match="no liver"):
        protocol_split(empty, "slab-random", k=1)


def test_select_label_slices(sample_volume, phantom):
    pool = liver_slices(phantom.label)
    sel = select_label_slices(phantom.label, 4)
    assert len(sel) == 4 and set(sel) <= set(pool) and sel == sorted(sel)
    assert sel == select_label_slices(phantom.label, 4, seed=0)
    seeded = [select_label_slices(sample_volume.label, 8, seed=s) for s in range(2, 6)]
    assert seeded[0] == select_label_slices(sample_volume.label, 8, seed=2)  # deterministic
    assert len({tuple(s) for s in seeded}) > 1  # seeds shift the grid
    gaps = np.diff(select_label_slices(sample_volume.label, 8))
    assert gaps.max() - gaps.min() <= 1  # evenly spread
    assert select_label_slices(phantom.label, 1000) == pool


# ---------------------------------------------------------------------------------------
# dataset indexes and volume splits
# ---------------------------------------------------------------------------------------
def _tiny(seed):
    rng = np.random.default_rng(seed)
    hu = rng.normal(0, 30, (6, 8, 8)).astype(np.float32)
    lab = np.zeros((6, 8, 8), np.uint8)
    lab[2:4, 2:6, 2:6] = 1
    lab[3, 3, 3] = 2
    return hu, lab


def _make_msd(root: Path, n=3):
    task = root / "Task03_Liver"
    training = []
    for i in range(n):
        hu, lab = _tiny(i)
        save_volume_nifti(hu, task / "imagesTr" / f"liver_{i}.nii.gz", spacing=(2, 1, 1))
        save_volume_nifti(lab, task / "labelsTr" / f"liver_{i}.nii.gz", spacing=(2, 1, 1), label=True)
        training.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
    save_volume_nifti(_tiny(9)[0], task / "imagesTs" / "liver_9.nii.gz", spacing=(2, 1, 1))
    (task / "dataset.json").write_text(json.dumps({
        "name": "Liver", "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "training": training, "test": ["./imagesTs/liver_9.nii.gz"]}))
    for side in task.rglob("*.samliver.json"):
        side.unlink()  # real MSD has no sidecars
    return task


def test_index_msd(tmp_path):
    task = _make_msd(tmp_path)
    cases = index_msd(task)
    assert [c.case_id for c in cases] == ["liver_0", "liver_1", "liver_2", "liver_9"]
    assert cases[-1].label is None
    vol = cases[1].load()
    np.testing.assert_array_equal(vol.label, _tiny(1)[1])
    assert vol.spacing == pytest.approx((2, 1, 1))
    assert index_dataset(task) == cases
    (task / "labelsTr" / "liver_2.nii.gz").unlink()
    with pytest.raises(SamliverError, match="liver_2.*missing"):
        index_msd(task)
    with pytest.raises(SamliverError, match="dataset.json"):
        index_msd(tmp_path)


def test_index_lits_and_pairs(tmp_path):
    lits = tmp_path / "lits"
    (lits / "part1").mkdir(parents=True)
    for n in (10, 2):
        hu, lab = _tiny(n)
        nib.save(nib.Nifti1Image(hu, np.eye(4)), str(lits / "part1" / f"volume-{n}.nii"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(lits / f"segmentation-{n}.nii"))
    cases = index_lits(lits)
    assert [c.case_id for c in cases] == ["volume-2", "volume-10"]
    assert cases[0].label.name == "segmentation-2.nii"
    assert index_dataset(lits) == cases

    pairs = tmp_path / "pairs"
    for name in ("a", "b"):
        hu, lab = _tiny(ord(name))
        save_volume_nifti(hu, pairs / "images" / f"{name}.nii.gz", spacing=(1, 1, 1))
        save_volume_nifti(lab, pairs / "labels" / f"{name}.nii.gz", spacing=(1, 1, 1), label=True)
    got = index_dataset(pairs)
    assert [c.case_id for c in got] == ["a", "b"] and all(c.label is not None for c in got)
    flat = tmp_path / "flat"
    save_volume_nifti(_tiny(1)[0], flat / "c1.nii.gz", spacing=(1, 1, 1))
    save_volume_nifti(_tiny(1)[1], flat / "c1_seg.nii.gz", spacing=(1, 1, 1), label=True)
    got = index_pairs(flat, label_suffix="_seg")
    assert [(c.case_id, c.label.name) for c in got] == [("c1", "c1_seg.nii.gz")]
    with pytest.raises(SamliverError):
        index_dataset(tmp_path / "nowhere")


def test_split_by_volume():
    cases = [Case(f"c{i}", Path(f"c{i}.nii")) for i in range(10)]
    s = split_by_volume(cases, test_fraction=0.2, val_fraction=0.1, seed=3)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (7, 1, 2)
    assert sorted(c.case_id for part in s.values() for c in part) == sorted(c.case_id for c in cases)
    assert s == split_by_volume(cases, test_fraction=0.2, val_fraction=0.1, seed=3)
    assert s != split_by_volume(cases, test_fraction=0.2, val_fraction=0.1, seed=4)
    with pytest.raises(SamliverError):
        split_by_volume(cases[:1], test_fraction=0.5)


# ---------------------------------------------------------------------------------------
# downloads from a local server
# ---------------------------------------------------------------------------------------
class _RangeHandler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    log: list = []
    honour_range = True

    def do_GET(self):  # noqa: N802
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        self.log.append((self.path, rng))
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    _RangeHandler.files, _RangeHandler.log, _RangeHandler.honour_range = {}, [], True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _RangeHandler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _msd_tar_gz(tmp_path) -> bytes:
    task = _make_msd(tmp_path / "src", n=2)
    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(task, arcname="Task03_Liver")
    return buf.getvalue()


def test_download_resume_and_checksum(tmp_path, server):
    handler, base = server
    payload = bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8))
    handler.files["/blob.bin"] = payload
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "blob.bin"
    part = tmp_path / "blob.bin.part"
    part.write_bytes(payload[:123_456])  # an interrupted earlier download
    out = download_file(f"{base}/blob.bin", dest, sha256=sha, progress=False)
    assert out.read_bytes() == payload and not part.exists()
    assert handler.log[-1] == ("/blob.bin", "bytes=123456-")
    # reused when present and valid: no new request
    n = len(handler.log)
    download_file(f"{base}/blob.bin", dest, sha256=sha, progress=False)
    assert len(handler.log) == n
    # a server that ignores Range: start over, still correct
    handler.honour_range = False
    dest2 = tmp_path / "b2.bin"
    (tmp_path / "b2.bin.part").write_bytes(b"garbage")
    assert download_file(f"{base}/blob.bin", dest2, md5=hashlib.md5(payload).hexdigest(),
                         progress=False).read_bytes() == payload


def test_download_bad_checksum(tmp_path, server):
    handler, base = server
    handler.files["/x.bin"] = b"hello world" * 100
    with pytest.raises(SamliverError, match="Checksum mismatch"):
        download_file(f"{base}/x.bin", tmp_path / "x.bin", sha256="0" * 64, progress=False)
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.part").exists()
    with pytest.raises(SamliverError, match="404"):
        download_file(f"{base}/missing.bin", tmp_path / "m.bin", progress=False)


def test_download_msd_liver(tmp_path, server):
    handler, base = server
    blob = _msd_tar_gz(tmp_path)
    handler.files["/Task03_Liver.tar.gz"] = blob
    sha = hashlib.sha256(blob).hexdigest()
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "Task03_Liver.tar.gz.part").write_bytes(blob[: len(blob) // 3])
    task = download_msd_liver(dest, url=f"{base}/Task03_Liver.tar.gz", sha256=sha, progress=False)
    assert task == dest / "Task03_Liver"
    assert handler.log[-1][1] == f"bytes={len(blob) // 3}-"
    cases = index_msd(task)
    assert [c.case_id for c in cases] == ["liver_0", "liver_1", "liver_9"]
    n = len(handler.log)
    assert download_msd_liver(dest, url=f"{base}/Task03_Liver.tar.gz", sha256=sha, progress=False) == task
    assert len(handler.log) == n  # idempotent
    with pytest.raises(SamliverError, match="Checksum mismatch"):
        download_msd_liver(tmp_path / "other", url=f"{base}/Task03_Liver.tar.gz", md5="0" * 32,
                           progress=False)


def test_download_dest_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SamliverError, match="writable"):
        download_msd_liver(blocker / "sub", url="http://127.0.0.1:9/none.tar", progress=False)


# ---------------------------------------------------------------------------------------
# the data_scripts wrappers
# ---------------------------------------------------------------------------------------
SCRIPTS = Path(__file__).resolve().parent.parent / "data_scripts"


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_msd_script_against_local_archive(tmp_path, server, capsys):
    handler, base = server
    blob = _msd_tar_gz(tmp_path)
    handler.files["/Task03_Liver.tar.gz"] = blob
    script = _load_script("download_msd_liver")
    rc = script.main([str(tmp_path / "d"), "--url", f"{base}/Task03_Liver.tar.gz",
                      "--sha256", hashlib.sha256(blob).hexdigest()])
    assert rc == 0 and "2 labelled cases, 1 test images" in capsys.readouterr().out
    rc = script.main([str(tmp_path / "e"), "--url", f"{base}/Task03_Liver.tar.gz", "--sha256", "1" * 64])
    assert rc == 2 and "Checksum mismatch" in capsys.readouterr().err


def test_fetch_sample_script():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(SCRIPTS / "fetch_sample.py"), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shape"] == [128, 128, 128]
