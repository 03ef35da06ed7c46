import numpy as np
import pytest

from samliver.preprocess import WINDOWS, SliceTransform, get_window, window_to_unit
from samliver.util import SamliverError


def test_windows_named_and_custom():
    assert WINDOWS["abdomen"] == (-160, 240)
    assert WINDOWS["liver"] == (-200, 200)
    hu = np.array([-1000, -160, 40, 240, 3000], dtype=np.float32)
    out = window_to_unit(hu, "abdomen")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-6)
    np.testing.assert_allclose(window_to_unit(hu, (-100, 400)), [0, 0, 0.28, 0.68, 1], atol=1e-6)
    assert get_window((0, 10)) == (0.0, 10.0)


@pytest.mark.parametrize("bad", ["nope", (10, 0), "x"])
def test_bad_window(bad):
    with pytest.raises(SamliverError):
        window_to_unit(np.zeros(3), bad)


@pytest.mark.parametrize("hw", [(128, 128), (512, 512), (300, 200), (171, 512), (100, 37)])
def test_slice_transform_geometry(hw):
    t = SliceTransform(hw, target=256)
    assert max(t.input_hw) == 256
    scale = 256 / max(hw)
    assert t.input_hw == (int(hw[0] * scale + 0.5), int(hw[1] * scale + 0.5))
    img = np.random.default_rng(0).random(hw).astype(np.float32)
    out = t.apply_image(img)
    assert out.shape == (256, 256) and out.dtype == np.float32
    # padding is bottom/right and zero
    assert np.all(out[t.input_hw[0]:, :] == 0) and np.all(out[:, t.input_hw[1]:] == 0)
    rgb = t.apply_image(np.stack([img] * 3, axis=-1))
    assert rgb.shape == (256, 256, 3)
    np.testing.assert_allclose(rgb[..., 1], out, atol=1e-6)


def test_coords_round_trip_and_values():
    t = SliceTransform((300, 200), target=256)  # input_hw (256, 171)
    assert t.input_hw == (256, 171)
    xy = np.array([[0.0, 0.0], [199.0, 299.0], [50.5, 120.25]])
    m = t.apply_coords(xy)
    np.testing.assert_allclose(m[1], [199 * 171 / 200, 299 * 256 / 300])
    np.testing.assert_allclose(t.inverse_coords(m), xy, atol=1e-9)
    boxes = np.array([[10, 20, 110, 220], [0, 0, 199, 299]], dtype=float)
    mb = t.apply_boxes(boxes)
    np.testing.assert_allclose(mb[0], [10 * 171 / 200, 20 * 256 / 300, 110 * 171 / 200, 220 * 256 / 300])
    np.testing.assert_allclose(t.inverse_boxes(mb), boxes)


@pytest.mark.parametrize("hw", [(128, 128), (300, 200), (512, 512), (90, 140)])
def test_label_round_trip_through_model_frame(hw):
    rng = np.random.default_rng(1)
    label = np.zeros(hw, dtype=np.uint8)
    label[hw[0] // 4: hw[0] // 2, hw[1] // 5: hw[1] // 2] = 1
    label[hw[0] // 3: hw[0] // 3 + 8, hw[1] // 4: hw[1] // 4 + 8] = 2
    t = SliceTransform(hw, target=256)
    lab_in = t.label_to_input(label)
    assert lab_in.dtype == np.int64 and lab_in.shape == (256, 256)
    assert not lab_in[t.input_hw[0]:].any() and not lab_in[:, t.input_hw[1]:].any()
    back = t.mask_to_original(lab_in)
    assert back.shape == hw
    agree = (back == label).mean()
    assert agree > 0.99, agree
    if max(hw) <= 256:  # upsampling then nearest back is exact
        np.testing.assert_array_equal(back, label)
    # boolean masks keep their dtype, stacks keep leading dims
    stack = np.stack([lab_in == 1, lab_in == 2])
    b2 = t.mask_to_original(stack)
    assert b2.dtype == bool and b2.shape == (2, *hw)
    del rng


def test_mask_to_original_float_low_res_and_torch():
    import torch

    hw = (300, 200)
    t = SliceTransform(hw, target=256)
    # a logit map over the padded frame at 64x64: positive in the top-left quarter of the *input* region
    ih, iw = t.input_hw
    full = -np.ones((256, 256), dtype=np.float32)
    full[: ih // 2, : iw // 2] = 1.0
    low = torch.nn.functional.interpolate(torch.from_numpy(full)[None, None], size=(64, 64),
                                          mode="bilinear", align_corners=False)[0, 0].numpy()
    back = t.mask_to_original(low[None])
    assert back.shape == (1, *hw) and back.dtype == np.float32
    pos = back[0] > 0
    # the positive region is about the top-left quarter of the original slice
    assert abs(pos[: hw[0] // 2, : hw[1] // 2].mean() - 1.0) < 0.1
    assert pos[hw[0] // 2 + 10:, :].mean() < 0.02 and pos[:, hw[1] // 2 + 10:].mean() < 0.02
    tt = t.mask_to_original(torch.from_numpy(low)[None, None])
    assert isinstance(tt, torch.Tensor) and tuple(tt.shape) == (1, 1, *hw)
    np.testing.assert_allclose(tt[0].numpy(), back, atol=1e-5)


def test_point_lands_on_same_pixel():
    # a one-pixel mark moved into the model frame and back hits the same original pixel
    hw = (100, 37)
    t = SliceTransform(hw, target=256)
    for x, y in [(0, 0), (36, 99), (20, 50)]:
        lab = np.zeros(hw, dtype=np.uint8)
        lab[y, x] = 1
        ys, xs = np.nonzero(t.label_to_input(lab))
        cx, cy = t.inverse_coords(np.array([xs.mean(), ys.mean()]))
        assert abs(cx - x) <= 0.5 and abs(cy - y) <= 0.5


def test_wrong_shapes():
    t = SliceTransform((64, 64))
    with pytest.raises(SamliverError):
        t.apply_image(np.zeros((32, 32)))
    with pytest.raises(SamliverError):
        t.label_to_input(np.zeros((32, 32)))
    with pytest.raises(SamliverError):
        SliceTransform((0, 10))
