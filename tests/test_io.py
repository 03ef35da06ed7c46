import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samliver.cli.info import main
from samliver.io import (
    CTVolume,
    count_lesions,
    list_dicom_series,
    load_volume,
    save_label_nifti,
    save_volume_nifti,
    summarise_volume,
)
from samliver.util import SamliverError


# ---------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------
def _oblique_nifti(tmp_path, name="img.nii.gz"):
    """A NIfTI whose array axes are (anterior-posterior, superior-inferior, right-left)-ish."""
    rng = np.random.default_rng(0)
    data = rng.normal(0, 50, size=(20, 12, 16)).astype(np.float32)  # (i, j, k)
    affine = np.array([
        [0.0, 0.0, -0.8, 100.0],   # k -> towards patient right (x decreasing)
        [-0.7, 0.0, 0.0, 50.0],    # i -> posterior (y decreasing)
        [0.0, 2.5, 0.0, -300.0],   # j -> superior
        [0, 0, 0, 1],
    ])
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path, data, affine


def test_nifti_reoriented_axis0_axial(tmp_path):
    path, data, affine = _oblique_nifti(tmp_path)
    vol = load_volume(path)
    assert vol.shape == (12, 20, 16)  # z from j, y from i, x from k
    assert vol.hu.dtype == np.float32
    np.testing.assert_allclose(vol.spacing, (2.5, 0.7, 0.8))
    a = vol.affine
    # axis 0 runs head -> feet, axis 1 anterior -> posterior, axis 2 right -> left (world RAS)
    assert a[2, 0] < 0 and np.allclose(a[:2, 0], 0)
    assert a[1, 1] < 0 and np.allclose(a[[0, 2], 1], 0)
    assert a[0, 2] < 0 and np.allclose(a[1:3, 2], 0)
    # each voxel keeps its world position and value
    rng = np.random.default_rng(1)
    for _ in range(20):
        z, y, x = (int(rng.integers(n)) for n in vol.shape)
        world = a @ [z, y, x, 1]
        ijk = np.rint(np.linalg.solve(affine, world)).astype(int)[:3]
        assert vol.hu[z, y, x] == data[tuple(ijk)]


def test_label_written_back_in_source_geometry(tmp_path):
    path, data, affine = _oblique_nifti(tmp_path)
    vol = load_volume(path)
    label = np.zeros(vol.shape, dtype=np.uint8)
    marks = [(2, 5, 7, 1), (10, 19, 0, 2), (0, 0, 15, 1)]
    for z, y, x, v in marks:
        label[z, y, x] = v
    out = save_label_nifti(label, vol, tmp_path / "label.nii.gz")
    img = nib.load(str(out))
    assert img.shape == data.shape
    np.testing.assert_allclose(img.affine, affine)
    assert img.get_data_dtype() == np.uint8
    arr = np.asarray(img.dataobj)
    for z, y, x, v in marks:
        world = vol.affine @ [z, y, x, 1]
        ijk = np.rint(np.linalg.solve(img.affine, world)).astype(int)[:3]
        assert arr[tuple(ijk)] == v
    assert (arr > 0).sum() == len(marks)
    # and it reads back as our label
    again = load_volume(path, out)
    np.testing.assert_array_equal(again.label, label)


def test_label_writer_for_sources_without_nifti(tmp_path, phantom):
    out = save_label_nifti(phantom.label, phantom, tmp_path / "p.nii.gz")
    img = nib.load(str(out))
    np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.8, 2.5))
    back = load_volume(out)
    np.testing.assert_array_equal(back.hu.astype(np.uint8), phantom.label)
    np.testing.assert_allclose(back.affine, phantom.affine)


def test_save_volume_nifti_unknown_spacing(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    p = save_volume_nifti(arr, tmp_path / "v.nii.gz", spacing=None)
    v = load_volume(p)
    np.testing.assert_array_equal(v.hu, arr)
    assert v.spacing is None and v.affine is None
    p2 = save_volume_nifti(arr, tmp_path / "w.nii", spacing=(3.0, 0.5, 0.6))
    assert load_volume(p2).spacing == pytest.approx((3.0, 0.5, 0.6))


def test_truncated_nifti_is_a_clear_error(tmp_path):
    path, _, _ = _oblique_nifti(tmp_path)
    raw = path.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SamliverError, match="truncated.nii.gz.*(truncated|corrupt)"):
        load_volume(bad)
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"not a nifti at all" * 10)
    with pytest.raises(SamliverError, match="junk.nii"):
        load_volume(junk)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(SamliverError, match="does not exist"):
        load_volume(tmp_path / "nope.nii.gz")
    other = tmp_path / "x.png"
    other.write_bytes(b"\x89PNG")
    with pytest.raises(SamliverError, match="unsupported"):
        load_volume(other)


def test_non_3d_data(tmp_path):
    p2 = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10), np.float32), np.eye(4)), str(p2))
    with pytest.raises(SamliverError, match="2-D"):
        load_volume(p2)
    p4 = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 3), np.float32), np.eye(4)), str(p4))
    with pytest.raises(SamliverError, match="4-D"):
        load_volume(p4)
    p41 = tmp_path / "4d1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8, 1), np.float32), np.eye(4)), str(p41))
    assert load_volume(p41).shape == (8, 7, 6)


def test_label_checks(tmp_path):
    path, data, affine = _oblique_nifti(tmp_path)
    wrong_shape = tmp_path / "ws.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 12, 15), np.uint8), affine), str(wrong_shape))
    with pytest.raises(SamliverError, match="shape"):
        load_volume(path, wrong_shape)
    bad_values = tmp_path / "bv.nii.gz"
    lab = np.zeros(data.shape, np.uint8)
    lab[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(lab, affine), str(bad_values))
    with pytest.raises(SamliverError, match=r"values \[7\] outside"):
        load_volume(path, bad_values)
    float_ok = tmp_path / "f.nii.gz"
    nib.save(nib.Nifti1Image(np.where(data > 0, 1.0, 0.0).astype(np.float32), affine), str(float_ok))
    assert set(np.unique(load_volume(path, float_ok).label)) <= {0, 1}
    vol = load_volume(path)
    with pytest.raises(SamliverError, match="outside"):
        save_label_nifti(np.full(vol.shape, 3, np.uint8), vol, tmp_path / "o.nii.gz")
    with pytest.raises(SamliverError, match="shape"):
        save_label_nifti(np.zeros((2, 2, 2), np.uint8), vol, tmp_path / "o.nii.gz")


# ---------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------
def _write_series(folder: Path, hu: np.ndarray, *, series_uid=None, spacing=(2.0, 0.75, 0.8),
                  origin=(-100.0, -120.0, 50.0), slope=1.0, intercept=-1024.0, prefix="im"):
    """Write ``hu`` (z, y, x) as an axial DICOM series; z increases towards the feet."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study = generate_uid()
    order = np.random.default_rng(0).permutation(hu.shape[0])  # file names not in slice order
    for n, z in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.PatientName = "Phantom^Test"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        # LPS: z index runs to the feet = decreasing S
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] - z * spacing[0]]
        ds.InstanceNumber = int(z) + 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        stored = np.rint((hu[z] - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.save_as(str(folder / f"{prefix}{n:03d}.dcm"), enforce_file_format=True)
    (folder / "README.txt").write_text("not dicom")
    return series_uid


def test_dicom_series(tmp_path, small_phantom):
    hu = np.rint(np.clip(small_phantom.hu, -1000, 2000))
    _write_series(tmp_path / "ct", hu, slope=2.0, intercept=-1024.0)
    vol = load_volume(tmp_path / "ct")
    np.testing.assert_allclose(vol.hu, np.rint((hu + 1024) / 2) * 2 - 1024)
    np.testing.assert_allclose(vol.spacing, (2.0, 0.75, 0.8))
    # world of voxel (z, y, x): LPS (-100 + 0.8x, -120 + 0.75y, 50 - 2z) -> RAS
    w = vol.affine @ [3, 4, 5, 1]
    np.testing.assert_allclose(w[:3], [100 - 0.8 * 5, 120 - 0.75 * 4, 50 - 2 * 3])
    # a label written for the series lands at the same world point
    label = np.zeros(vol.shape, np.uint8)
    label[3, 4, 5] = 2
    out = save_label_nifti(label, vol, tmp_path / "seg.nii.gz")
    img = nib.load(str(out))
    ijk = np.argwhere(np.asarray(img.dataobj) == 2)[0]
    np.testing.assert_allclose((img.affine @ [*ijk, 1])[:3], w[:3])


def test_dicom_series_reversed_positions(tmp_path, small_phantom):
    # slices stored feet-first still come out head -> feet
    hu = np.rint(np.clip(small_phantom.hu, -1000, 2000))
    _write_series(tmp_path / "ct", hu[::-1].copy(), origin=(-100.0, -120.0, 50.0 - 2.0 * 15))
    vol = load_volume(tmp_path / "ct")
    np.testing.assert_allclose(vol.hu, hu[::-1].copy())  # position order wins over file order
    assert vol.affine[2, 0] < 0


def test_dicom_several_series(tmp_path, small_phantom):
    hu = np.rint(np.clip(small_phantom.hu[:4], -1000, 2000))
    a = _write_series(tmp_path / "ct", hu, prefix="a")
    b = _write_series(tmp_path / "ct", hu + 10, prefix="b")
    assert list_dicom_series(tmp_path / "ct") == {a: 4, b: 4}
    with pytest.raises(SamliverError) as err:
        load_volume(tmp_path / "ct")
    assert a in str(err.value) and b in str(err.value) and "series-uid" in str(err.value)
    vol = load_volume(tmp_path / "ct", series_uid=b)
    np.testing.assert_allclose(vol.hu, hu + 10)
    with pytest.raises(SamliverError, match="not in"):
        load_volume(tmp_path / "ct", series_uid="1.2.3")


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamliverError, match="No DICOM"):
        load_volume(tmp_path / "empty")


# ---------------------------------------------------------------------------------------
# MRC, summaries, CLI
# ---------------------------------------------------------------------------------------
def test_mrc(tmp_path):
    import mrcfile

    arr = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    with mrcfile.new(str(tmp_path / "v.mrc")) as m:
        m.set_data(arr)
    lab = np.zeros((3, 4, 5), np.uint16)
    lab[1, 2, 3] = 2
    with mrcfile.new(str(tmp_path / "l.mrc")) as m:
        m.set_data(lab)
    v = load_volume(tmp_path / "v.mrc", tmp_path / "l.mrc")
    np.testing.assert_array_equal(v.hu, arr)
    assert v.spacing is None and v.label[1, 2, 3] == 2 and v.label.dtype == np.uint8


def test_summary_counts(phantom):
    s = summarise_volume(phantom)
    assert s["lesions_3d"] == 3 == count_lesions(phantom.label)
    assert s["voxels"]["tumour"] == int((phantom.label == 2).sum())
    assert s["volume_ml"]["tumour"] > 0
    unknown = summarise_volume(CTVolume(hu=phantom.hu, label=phantom.label))
    assert unknown["units"].startswith("voxels") and "volume_ml" not in unknown


def test_info_cli(tmp_path, capsys, sample_volume):
    from samliver.sample import fetch_sample

    info = fetch_sample()
    assert main([info["image"], "--label", info["label"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape_zyx"] == [128, 128, 128] and out["spacing_zyx_mm"] is None
    assert out["labels_present"] == [0, 1, 2] and out["lesions_3d"] >= 1
    assert main([info["image"]]) == 0
    assert "spacing:  unknown" in capsys.readouterr().out
