"""``resize_map`` / ``AnomalyResult.from_map``: the numpy resize of maps to the original image size
used by the torch-free ONNX runtime, checked against the ``F.interpolate`` of ``AnomalyCLIP.predict``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anomalyclip.errors import InvalidInputError
from anomalyclip.outputs import AnomalyResult, resize_map
from anomalyclip.preprocessing import preprocess_array

from .conftest import IMAGE_A, IMAGE_B


def _torch_resize(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(m)[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("size", [(300, 400), (256, 256), (518, 518), (7, 1000), (1, 1), (1037, 59)])
def test_resize_map_matches_torch_bilinear(size):
    rng = np.random.default_rng(sum(size))
    m = (rng.random((518, 518), dtype=np.float32) * 4).astype(np.float32)
    ours = resize_map(m, size)
    assert ours.shape == size and ours.dtype == np.float32
    assert np.abs(ours - _torch_resize(m, size)).max() < 1e-6


def test_resize_map_of_a_real_map_and_identity(golden):
    m = golden["a.multi.anomaly_map"][0].numpy()
    assert np.abs(resize_map(m, (300, 400)) - _torch_resize(m, (300, 400))).max() < 1e-6
    assert np.array_equal(resize_map(m, m.shape), m)
    with pytest.raises(InvalidInputError):
        resize_map(m[None], (3, 3))


def test_resize_map_is_the_resize_of_torch_predict(golden_model):
    """resize_map of forward's map reproduces model.predict's map (F.interpolate) to 1e-6."""
    result = golden_model.predict(IMAGE_A)
    with torch.inference_mode():
        out = golden_model(golden_model.preprocess(IMAGE_A))
    assert np.abs(resize_map(out.anomaly_maps[0].numpy(), (300, 400)) - result.anomaly_map).max() < 1e-6


def test_result_from_map_resizes_and_decides():
    m = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    r = AnomalyResult.from_map(np.float32(0.7), m, (4, 6), image_threshold=0.5, pixel_threshold=1.5, path="x.png")
    assert isinstance(r.score, float) and r.label == 1 and r.path == "x.png"
    assert r.anomaly_map.shape == (4, 6) and r.mask.shape == (4, 6)
    assert np.array_equal(r.mask, r.anomaly_map > 1.5)


def test_tensor_inputs_still_recognised_by_the_numpy_preprocessing():
    img = Image.open(IMAGE_B).convert("RGB")
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    assert np.array_equal(preprocess_array(tensor, 224), preprocess_array(img, 224))
