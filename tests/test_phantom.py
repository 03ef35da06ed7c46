import numpy as np
import pytest

from samliver.io import count_lesions
from samliver.phantom import make_phantom
from samliver.util import SamliverError


def test_phantom_defaults(phantom):
    v = phantom
    assert v.shape == (32, 128, 128) and v.hu.dtype == np.float32
    assert v.spacing == (2.5, 0.8, 0.8) and v.affine.shape == (4, 4)
    assert v.label.dtype == np.uint8 and set(np.unique(v.label).tolist()) == {0, 1, 2}
    assert count_lesions(v.label) == 3


def test_phantom_hu_realistic(phantom):
    hu, lab = phantom.hu, phantom.label
    liver = np.median(hu[lab == 1])
    lesion = np.median(hu[lab == 2])
    assert 45 < liver < 75
    assert 10 < lesion < 40 and lesion < liver - 20  # hypodense lesions
    assert hu.min() < -900  # air outside the body
    assert hu.max() > 300  # bone
    assert np.any((hu > -150) & (hu < -50))  # fat
    # noise of about 10 HU inside the liver (away from edges)
    from scipy import ndimage

    core = ndimage.binary_erosion(lab == 1, iterations=3)
    assert 6 < hu[core].std() < 16


def test_lesions_inside_liver(phantom):
    from scipy import ndimage

    tumour = phantom.label == 2
    ring = ndimage.binary_dilation(tumour) & ~tumour
    assert np.all(phantom.label[ring] >= 1)  # every lesion is surrounded by liver


def test_phantom_deterministic_and_options():
    a = make_phantom((16, 64, 64), n_lesions=2, seed=5)
    b = make_phantom((16, 64, 64), n_lesions=2, seed=5)
    c = make_phantom((16, 64, 64), n_lesions=2, seed=6)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert not np.array_equal(a.label, c.label)
    assert count_lesions(make_phantom((24, 96, 96), n_lesions=5, seed=2).label) == 5
    none = make_phantom((16, 64, 64), n_lesions=0, seed=0, spacing=None)
    assert none.spacing is None and (none.label == 2).sum() == 0


def test_phantom_bad_shape():
    with pytest.raises(SamliverError):
        make_phantom((4, 64, 64))


def test_write_phantom_dataset_msd_layout(tmp_path):
    import json

    from samliver.datasets import index_dataset
    from samliver.phantom import write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "Task", volumes=2, shape=(12, 64, 64), n_lesions=1, seed=3)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["labels"]["2"] == "cancer"
    cases = index_dataset(root)
    assert [c.case_id for c in cases] == ["liver_0", "liver_1"]
    vol = cases[1].load()
    ref = make_phantom((12, 64, 64), n_lesions=1, seed=4)
    np.testing.assert_array_equal(vol.label, ref.label)
    np.testing.assert_allclose(vol.hu, ref.hu, atol=1e-3)
    with pytest.raises(SamliverError, match="not an empty folder"):
        write_phantom_dataset(root, volumes=1)


def test_make_phantom_dataset_cli(tmp_path, capsys):
    import json

    from samliver import cli

    assert cli.main(["make-phantom-dataset", str(tmp_path / "d"), "--volumes", "1",
                     "--shape", "12,64,64", "--lesions", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["volumes"] == 1
    assert cli.main(["make-phantom-dataset", str(tmp_path / "e"), "--shape", "12,64"]) == 2
