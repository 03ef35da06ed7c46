"""Head checkpoints record what they were trained for, derived from the model (never by hand)."""

import pytest

from samliver.checkpoints import load_head, model_info, read_checkpoint, save_checkpoint
from samliver.heads import build_head
from samliver.training import TrainConfig
from samliver.util import SamliverError


class _Model:
    name, weights_id, embed_dim, embed_hw, image_size = "fake", "f" * 64, 16, (16, 16), 32


class _Embeddings:
    window = (-100.0, 200.0)


def test_model_info_comes_from_model_and_embeddings():
    assert model_info(_Model()) == {"model_name": "fake", "weights_id": "f" * 64, "window": "abdomen"}
    assert model_info(_Model(), _Embeddings())["window"] == (-100.0, 200.0)


def test_saved_head_records_its_model_and_refuses_another(tmp_path):
    head = build_head("linear", embed_dim=16, embed_hw=16, out_size=32)
    path = save_checkpoint(tmp_path / "h.pt", head, config=TrainConfig(kind="linear"),
                           model_info=model_info(_Model(), _Embeddings()))
    ckpt = read_checkpoint(path)
    assert (ckpt["model_name"], ckpt["window"], ckpt["embedding_shape"]) == ("fake", (-100.0, 200.0), [16, 16, 16])
    assert load_head(path, _Model()).checkpoint_info["model_name"] == "fake"

    class Other(_Model):
        name = "other"

    with pytest.raises(SamliverError, match="trained for model 'fake'"):
        load_head(path, Other())
