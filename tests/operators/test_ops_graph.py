"""The DALI-ops augmentation stages (dali_objcrop.ops_graph) on hand-checkable pixels."""
import numpy as np
import pytest

pytest.importorskip("nvidia.dali")


def _constant(x: float):
    return lambda: [np.array(x, np.float32)]


def _colour_once(value: float, brightness: float, contrast: float, saturation: float = 1.0,
                 hue: float = 0.0) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def

    from dali_objcrop.ops_graph import colour

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        img = fn.external_source(lambda: [np.full((4, 4, 3), value, np.float32)], batch=True)
        # a source must take no argument (DALI would pass one an iteration number)
        inp = {name: fn.external_source(_constant(x), batch=True) for name, x in (("brightness0", brightness), ("contrast0", contrast),
                               ("saturation0", saturation), ("hue0", hue))}
        return colour(img, inp, 0)

    p = pipe()
    p.build()
    (out,) = p.run()
    return np.array(out.as_tensor())[0]


@pytest.mark.parametrize("value, contrast", [(128.0, 1.4), (100.0, 1.5), (200.0, 0.6)])
def test_contrast_pivots_on_mid_grey(value, contrast):
    """Contrast scales around 128 as documented (augment.py), not around DALI's float half-range 0.5:
    with the 0.5 pivot a mid-grey image brightened by 40% under contrast 1.4 (it became 179)."""
    out = _colour_once(value, 1.0, contrast)
    np.testing.assert_allclose(out, np.clip(128 + (value - 128) * contrast, 0, 255), atol=1e-3)


def test_colour_stage_equals_the_reference_colour_matrix():
    """Brightness, contrast (pivot 128), saturation and hue together == kernels.reference.colour_matrix,
    the NumPy specification the fused crop operator is also tested against."""
    from dali_objcrop.kernels.reference import colour_matrix
    b, c, s, h, v = 1.2, 0.7, 0.6, 20.0, 90.0
    out = _colour_once(v, b, c, s, h)
    m, off = colour_matrix(b, c, s, h, center=128.0)
    np.testing.assert_allclose(out[0, 0], np.clip(m @ np.full(3, v) + off, 0, 255), atol=0.02)


def test_crop_views_stacks_local_views_in_order_at_their_own_side():
    """crop_views with local views: the two global views at size, local view j (inputs roi_start{2 + j}, ...)
    at local_size, stacked into one (M, 3, local_size, local_size) node per sample (FCHW) in row order;
    without local views the two global views alone, as finish_views(dali_crop(...)) gives them."""
    from nvidia.dali import fn, pipeline_def, types

    from dali_objcrop import augment
    from dali_objcrop.ops_graph import crop_views

    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [40, 80, 120]], np.uint8)
    image = np.repeat(colours[None, :, None, :], 8, axis=0).repeat(8, axis=2).reshape(8, 32, 3)  # 4 stripes
    plain = augment.ViewAug(jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    recipe = augment.Recipe("plain", (plain, plain), plain)
    # view v's window: global views the whole image, local view j stripe 3 - j
    rois = {0: (0, 0, 8, 32), 1: (0, 0, 8, 32)}
    rois.update({2 + j: (0, 8 * (3 - j), 8, 8 * (4 - j)) for j in range(4)})

    def run(local_crops):
        @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def pipe():
            img = fn.external_source(lambda: [image], batch=True, layout="HWC")
            inp = {}
            for v in range(2 + local_crops):
                y1, x1, y2, x2 = rois[v]
                inp[f"roi_start{v}"] = fn.external_source(_constant_vec((y1, x1)), batch=True)
                inp[f"roi_end{v}"] = fn.external_source(_constant_vec((y2, x2)), batch=True)
            return crop_views(img, inp, 16, recipe, "cpu", types.FLOAT, [0.0] * 3, [1.0] * 3,
                              local_crops=local_crops, local_size=5)

        p = pipe()
        p.build()
        return p.run()

    outs = run(4)
    assert len(outs) == 3 and outs[2].layout() == "FCHW"
    local = np.array(outs[2][0])
    assert np.array(outs[0][0]).shape == (3, 16, 16) and local.shape == (4, 3, 5, 5)
    for j in range(4):   # DALI's ROI resize reads across the window's edge: the edge columns mix stripes
        np.testing.assert_allclose(local[j][:, :, 1:4], np.broadcast_to(colours[3 - j][:, None, None], (3, 5, 3)),
                                   atol=1e-3)
    assert len(run(0)) == 2


def _constant_vec(values):
    return lambda: [np.array(values, np.float32)]
