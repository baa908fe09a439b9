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
