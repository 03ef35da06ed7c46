"""Heads: shapes, any embedding size, AutoSAM from a decoder, gradients flow."""

import numpy as np
import pytest
import torch

from samliver.heads import HEAD_KINDS, build_head
from samliver.util import SamliverError


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_output_shape(kind):
    torch.manual_seed(0)
    head = build_head(kind)
    emb = torch.randn(2, 256, 64, 64)
    image = torch.rand(2, 1, 256, 256)
    out = head(emb, image=image)
    assert out.shape == (2, 3, 256, 256)
    assert torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in head.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_other_embedding_size(kind):
    head = build_head(kind, embed_dim=32, n_classes=2, out_size=64)
    out = head(torch.randn(1, 32, 16, 16), image=torch.rand(1, 1, 64, 64))
    assert out.shape == (1, 2, 64, 64)


class _FakeModel:
    """Stands in for a SamModel: a randomly initialised decoder with a 64-channel embedding."""

    def __init__(self):
        from samliver.heads import _random_sam_parts

        self.mask_decoder, self.prompt_encoder = _random_sam_parts(64, 16)
        self.embed_dim, self.embed_hw, self.image_size, self.name = 64, (16, 16), 64, "fake"


def test_autosam_starts_from_model_decoder():
    model = _FakeModel()
    head = build_head("autosam", model=model)
    assert head.embed_dim == 64 and head.out_size == 64
    # class tokens start from the decoder's first mask token, hypernetworks are copies
    base = model.mask_decoder.mask_tokens.weight[0]
    assert torch.allclose(head.class_tokens.mean(0), base, atol=0.05)
    w0 = model.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight
    assert torch.equal(head.hyper_mlps[2].layers[0].weight, w0)
    # the model's own decoder is untouched by training the head
    assert head.transformer is not model.mask_decoder.transformer
    out = head(torch.randn(1, 64, 16, 16), image=torch.rand(1, 1, 64, 64))
    assert out.shape == (1, 3, 64, 64)


def _autosam_reference(head, emb, image):
    """AutoSAMHead's forward written with segment_anything's own modules (the code before the
    token-layout rewrite): the rewrite must compute the same function."""
    from torch.nn import functional as F

    b, c, h, w = emb.shape
    tokens = head.class_tokens[None].expand(b, -1, -1)
    hs, src = head.transformer(emb + head.dense, head.image_pe.expand(b, -1, -1, -1), tokens)
    up = head.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(head.hyper_mlps)], dim=1)
    logits = (hyper @ up.flatten(2)).view(b, -1, *up.shape[-2:]) + head.class_bias
    small = F.interpolate(logits, size=(head.refine_size,) * 2, mode="area")
    image = F.interpolate(image, size=(head.refine_size,) * 2, mode="area")
    refined = head.refine(torch.cat([small, head.skip(image)], dim=1))
    return logits + F.interpolate(refined, size=logits.shape[-2:], mode="bilinear",
                                  align_corners=False)


@pytest.mark.parametrize("fused_upscaling", [True, False])
def test_autosam_forward_matches_segment_anything_modules(fused_upscaling):
    # float64, so that only the summation order can differ: same outputs, same gradients
    torch.manual_seed(0)
    head = build_head("autosam", embed_dim=32, out_size=64, embed_hw=16, refine_size=32).double()
    with torch.no_grad():  # away from the zero-initialised refinement: every part matters
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if not fused_upscaling:  # an upscaling path of another shape runs the module's forward
        head.output_upscaling[1] = torch.nn.Identity()
    emb = torch.randn(2, 32, 16, 16, dtype=torch.float64)
    image = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    params = [p for p in head.parameters() if p.requires_grad]
    out, ref = head(emb, image=image), _autosam_reference(head, emb, image)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weights).sum(), params)
    ref_grads = torch.autograd.grad((ref * weights).sum(), params)
    scale = max(g.abs().max().item() for g in ref_grads)
    for (name, _), g, r in zip(head.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9 * scale, msg=name)


def test_autosam_bf16_gradients_close_to_float32():
    # Under bf16 autocast the upscaling's LayerNorm must not lose its weight / bias gradients
    # (the CPU layer_norm backward on bf16 inputs sums them over the pixels inaccurately).
    torch.manual_seed(0)
    head = build_head("autosam", embed_dim=32, out_size=128, embed_hw=32, refine_size=64)
    emb, image = torch.randn(4, 32, 32, 32), torch.rand(4, 1, 128, 128)
    weights = torch.randn(4, 3, 128, 128)
    ln = head.output_upscaling[1]

    def grads(bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = head(emb, image=image)
        return torch.autograd.grad((out.float() * weights).sum(), [ln.weight, ln.bias])

    for g16, g32 in zip(grads(True), grads(False)):
        assert (g16 - g32).norm() < 0.05 * g32.norm()


def test_autosam_state_dict_keys_unchanged():
    # checkpoints saved before the rewrite load: the head keeps segment_anything's modules
    keys = set(build_head("autosam", embed_dim=32, out_size=64, embed_hw=16).state_dict())
    assert {"transformer.layers.0.cross_attn_token_to_image.k_proj.weight",
            "output_upscaling.0.weight", "output_upscaling.1.weight", "image_pe",
            "class_tokens", "dense", "class_bias", "hyper_mlps.2.layers.0.weight"} <= keys


def test_autosam_train_parts():
    head = build_head("autosam", embed_dim=32, out_size=64, train_parts="tokens")
    assert not any(p.requires_grad for p in head.transformer.parameters())
    assert head.class_tokens.requires_grad
    with pytest.raises(SamliverError):
        head.set_train_parts("nothing")


def test_unknown_kind_and_missing_image():
    with pytest.raises(SamliverError, match="Unknown head"):
        build_head("resnet")
    head = build_head("cnn")
    with pytest.raises(SamliverError, match="image"):
        head(torch.randn(1, 256, 64, 64))
    assert build_head("cnn", use_image=False)(torch.randn(1, 256, 64, 64)).shape == (1, 3, 256, 256)


def test_cnn_full_resolution_refinement_starts_as_identity():
    torch.manual_seed(0)
    head = build_head("cnn", full_res=True).eval()  # eval: no dropout
    assert head.up.full is not None and head.options["full_res"] is True
    emb, image = torch.randn(1, 256, 64, 64), torch.rand(1, 1, 256, 256)
    out = head(emb, image=image)
    head.up.full = None  # the same head without the full-resolution block
    assert torch.allclose(out, head(emb, image=image))
    # without the image skip there is nothing to refine with
    assert build_head("cnn", full_res=True, use_image=False).up.full is None


def test_cnn_refinement_at_half_resolution():
    """refine_size=S/2 refines at the skip's resolution (a quarter of the cost), still starts as
    the identity, outputs S x S, and is stored in the head's options for checkpoints."""
    torch.manual_seed(0)
    head = build_head("cnn", refine_size=128).eval()
    assert head.options["refine_size"] == 128 and head.up.full is not None
    emb, image = torch.randn(1, 256, 64, 64), torch.rand(1, 1, 256, 256)
    out = head(emb, image=image)
    assert out.shape == (1, 3, 256, 256)
    head.up.full = None
    assert torch.allclose(out, head(emb, image=image))
    assert build_head("cnn", refine_size=512).up.refine_size == 256  # clamped to [S/2, S]
    assert build_head("cnn", refine_size=64).up.refine_size == 128


def test_context_head_starts_as_the_2d_head_and_checks_its_input():
    """A 2.5D cnn head (context=2) equals the plain head at step 0 (zero-initialised mix)."""
    from samliver.heads import head_context

    torch.manual_seed(0)
    plain = build_head("cnn", embed_dim=16, refine_size=128).eval()
    ctx = build_head("cnn", embed_dim=16, refine_size=128, context=2).eval()
    assert head_context(ctx) == 2 and head_context(plain) == 0
    assert ctx.options["context"] == 2  # what a checkpoint stores
    ctx.load_state_dict(plain.state_dict(), strict=False)
    x, im = torch.randn(2, 5 * 16, 64, 64), torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        assert torch.allclose(ctx(x, image=im), plain(x[:, 32:48], image=im), atol=1e-6)
    with pytest.raises(SamliverError, match="stacked slices"):
        ctx(x[:, :16], image=im)
    with pytest.raises(SamliverError, match="cnn head option"):
        build_head("vit", embed_dim=16, context=1)


def test_tta_option_is_stored_and_used(tmp_path):
    """tta=True rides in the head's options, so a loaded head predicts with flip TTA."""
    from samliver.checkpoints import load_head, save_checkpoint
    from samliver.training import TrainConfig

    head = build_head("cnn", embed_dim=16, tta=True)
    assert head.tta and head.options["tta"] is True
    path = save_checkpoint(tmp_path / "h.pt", head, config=TrainConfig(), model_info={"model_name": "x"})
    back = load_head(path, device="cpu")
    assert back.tta is True
    assert build_head("cnn", embed_dim=16).tta is False
    assert "tta" not in build_head("cnn", embed_dim=16).options


def test_fine_features_head_reads_the_finer_stage(tmp_path):
    """fine_features=F: the head reads an (F, S/2, S/2) map as fine=, merged at S/2; with the new
    fuse columns zeroed it is the plain head; the option survives a checkpoint."""
    from samliver.checkpoints import load_head, save_checkpoint
    from samliver.heads import head_fine_features, predict_logits
    from samliver.training import TrainConfig

    torch.manual_seed(0)
    plain = build_head("cnn", embed_dim=16, refine_size=128).eval()
    head = build_head("cnn", embed_dim=16, refine_size=128, fine_features=8).eval()
    assert head_fine_features(head) == 8 and head_fine_features(plain) == 0
    assert head.options["fine_features"] == 8
    emb, im, fine = torch.randn(2, 16, 64, 64), torch.rand(2, 1, 256, 256), torch.randn(2, 8, 128, 128)
    out = head(emb, image=im, fine=fine)
    assert out.shape == (2, 3, 256, 256) and torch.isfinite(out).all()
    # the fine path changes the prediction ...
    assert not torch.allclose(out, head(emb, image=im, fine=torch.zeros_like(fine)))
    # ... and without it the head is the plain one (fine columns of the fuse conv last)
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("fine.")}
    w = state["up.fuse.0.weight"]
    state["up.fuse.0.weight"] = w[:, :plain.up.fuse[0].in_channels]
    plain.load_state_dict(state)
    with torch.no_grad():
        head.up.fuse[0].weight[:, plain.up.fuse[0].in_channels:] = 0
        assert torch.allclose(head(emb, image=im, fine=fine), plain(emb, image=im), atol=1e-5)
    with pytest.raises(SamliverError, match="fine_features"):
        head(emb, image=im)
    with pytest.raises(SamliverError, match="fine_features"):
        head(emb, image=im, fine=fine[:, :4])
    with pytest.raises(SamliverError, match="cnn head option"):
        build_head("vit", embed_dim=16, fine_features=8)
    # predict_logits passes it (and flips it with TTA); a checkpoint rebuilds the option
    p = predict_logits(head, emb.numpy(), im[:, 0].numpy(), fine=fine.numpy(), tta=True)
    assert p.shape == (2, 3, 256, 256) and np.allclose(p.sum(1), 1, atol=1e-5)
    path = save_checkpoint(tmp_path / "h.pt", head, config=TrainConfig(), model_info={"model_name": "x"})
    assert head_fine_features(load_head(path, device="cpu")) == 8


def test_train_head_feeds_fine_features():
    """train_head(fine=) trains a fine_features head (same flips / rotations as the embedding)
    and refuses to train one without it."""
    from samliver.training import TrainConfig, train_head

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3, 16, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 3, (3, 64, 64))
    images = rng.random((3, 64, 64)).astype(np.float32)
    fine = rng.standard_normal((3, 8, 32, 32)).astype(np.float32)
    cfg = TrainConfig(kind="cnn", steps=3, batch_size=2, eval_every=3, augment="flip+rot",
                      head_options={"fine_features": 8}, threads=1)
    res = train_head(emb, labels, images=images, fine=fine, config=cfg, progress=False)
    assert res.head.fine_features == 8 and len(res.history["loss"]) == 3
    with pytest.raises(SamliverError, match="fine="):
        train_head(emb, labels, images=images, config=cfg, progress=False)


@pytest.mark.parametrize("kind", ["cnn", "autosam"])
def test_refine_size_is_clamped_to_the_model_frame(kind):
    """A recipe's refine_size=128 (S/2 of LiteMedSAM) becomes S/2 for SAM's 1024 frame, and the
    refined head still returns logits at S."""
    import torch

    small = build_head(kind, embed_dim=16, out_size=256, refine_size=128)
    assert small.refine_size == 128 if kind == "autosam" else small.up.refine_size == 128
    big = build_head(kind, embed_dim=16, out_size=1024, refine_size=128).eval()
    assert (big.refine_size if kind == "autosam" else big.up.refine_size) == 512
    with torch.no_grad():
        out = big(torch.randn(1, 16, 64, 64), image=torch.rand(1, 1, 1024, 1024))
    assert out.shape == (1, 3, 1024, 1024)
