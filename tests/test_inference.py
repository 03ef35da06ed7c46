"""Whole-volume prediction and the predict CLI."""

import numpy as np
import pytest

from samliver.util import SamliverError


def test_predict_volume_and_cli_with_tiny_model(tmp_path, monkeypatch):
    """Whole-volume prediction + `samliver predict` (tiny RANDOM model: shapes and geometry only)."""
    import nibabel as nib

    from samliver.checkpoints import save_checkpoint
    from samliver.cli.predict import main
    from samliver.heads import build_head
    from samliver.inference import predict_volume
    from samliver.io import load_volume, save_volume_nifti
    from samliver.models import get_model
    from samliver.phantom import make_phantom
    from samliver.training import TrainConfig

    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path / "home"))
    with pytest.warns(UserWarning):
        model = get_model("tiny", device="cpu")
    vol = make_phantom(shape=(8, 40, 48), n_lesions=1)
    vol.hu, vol.label = vol.hu[2:5].copy(), vol.label[2:5].copy()
    head = build_head("cnn", model=model)
    label = predict_volume(vol, model, head, progress=False)
    assert label.shape == vol.hu.shape and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 2}
    part = predict_volume(vol, model, head, slices=[1], postprocess_label=False, progress=False)
    assert part[0].sum() == 0 and part[2].sum() == 0

    ckpt = save_checkpoint(tmp_path / "head.pt", head, config=TrainConfig(kind="cnn"),
                           model_info={"model_name": "tiny", "weights_id": model.weights_id})
    src = save_volume_nifti(vol.hu, tmp_path / "ct.nii.gz", spacing=vol.spacing)
    out = tmp_path / "mask.nii.gz"
    assert main([str(src), "--head", str(ckpt), "-o", str(out), "--json"]) == 0
    img = nib.load(str(out))
    ref = nib.load(str(src))
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
    back = load_volume(src, out)
    assert back.label.shape == vol.hu.shape

    other = save_checkpoint(tmp_path / "other.pt", build_head("cnn", embed_dim=64),
                            config=TrainConfig(kind="cnn"), model_info={"model_name": "tiny"})
    with pytest.raises(SamliverError, match="embeddings of shape"):
        main([str(src), "--head", str(other), "-o", str(out), "--overwrite"])


def test_context_head_predicts_with_neighbours_encoded_on_demand(tmp_path, monkeypatch):
    """A 2.5D head gathers (and encodes) each slice's neighbours (tiny RANDOM model: plumbing)."""
    from samliver.embeddings import embed_volume
    from samliver.heads import build_head
    from samliver.inference import predict_probabilities
    from samliver.models import get_model
    from samliver.phantom import make_phantom

    monkeypatch.setenv("SAMLIVER_HOME", str(tmp_path / "home"))
    with pytest.warns(UserWarning):
        model = get_model("tiny", device="cpu")
    vol = make_phantom(shape=(8, 40, 48), n_lesions=1)
    emb = embed_volume(vol, model, slices=[2], progress=False)  # neighbours 0, 1, 3, 4 missing
    head = build_head("cnn", model=model, context=2, tta=True)
    zs, probs = predict_probabilities(vol, model, head, embeddings=emb, slices=[2], progress=False)
    assert zs == [2] and probs.shape == (1, 3, 40, 48)
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
