"""Prefetching (anomalyclip.prefetch) and the CUDA forms of the patch embedding and the blur,
checked on the CPU: results in order and identical to the sequential path, errors where they
belong, and the matrix-product forms against the convolutions and scipy."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from anomalyclip.errors import ImageLoadError, InvalidInputError
from anomalyclip.prefetch import default_num_workers, prefetch_batches, stack_batch

from .conftest import IMAGE_A, IMAGE_B


def test_batches_come_in_order_with_and_without_workers():
    items = list(range(23))

    def slow_square(x: int) -> int:
        time.sleep(0.001 * (x % 3))  # finish out of order
        return x * x

    expected = [[x * x for x in items[i : i + 5]] for i in range(0, 23, 5)]
    assert list(prefetch_batches(items, slow_square, 5)) == expected
    assert list(prefetch_batches(items, slow_square, 5, num_workers=4, prefetch=1)) == expected


def test_workers_run_ahead_but_only_a_few_batches():
    started: list[int] = []
    lock = threading.Lock()

    def record(x: int) -> int:
        with lock:
            started.append(x)
        return x

    batches = prefetch_batches(list(range(100)), record, 4, num_workers=2, prefetch=2)
    first = next(batches)
    time.sleep(0.05)
    assert first == [0, 1, 2, 3]
    assert len(started) <= 4 * 4  # the consumed batch, the next one and two ahead at most
    batches.close()  # cancels the rest
    assert len(started) <= 4 * 4


def test_an_error_is_raised_at_its_batch_after_the_earlier_ones():
    def fail_on_seven(x: int) -> int:
        if x == 7:
            raise ValueError("seven")
        return x

    for workers in (0, 3):
        got = []
        with pytest.raises(ValueError, match="seven"):
            for batch in prefetch_batches(list(range(12)), fail_on_seven, 3, num_workers=workers):
                got.append(batch)
        assert got == [[0, 1, 2], [3, 4, 5]]


def test_default_workers_and_plain_stack():
    assert default_num_workers("cpu") == 0
    assert 1 <= default_num_workers("cuda") <= 8  # a device type; nothing is allocated on it
    tensors = [torch.full((3, 2), float(i)) for i in range(4)]
    stacked = stack_batch(tensors)
    assert torch.equal(stacked, torch.stack(tensors)) and not stacked.is_pinned()


def test_predict_and_calibrate_with_workers_equal_the_sequential_path(fresh_model):
    model = fresh_model.reconfigure(image_size=112)
    images = [IMAGE_A, IMAGE_B, torch.rand(40, 30, 3).numpy()]
    sequential = model.predict(images, batch_size=2, num_workers=0)
    threaded = model.predict(images, batch_size=2, num_workers=2)
    assert [r.anomaly_map.shape for r in threaded] == [(300, 400), (256, 256), (40, 30)]
    for s, t in zip(sequential, threaded):
        assert s.score == t.score and np.array_equal(s.anomaly_map, t.anomaly_map)
    assert model.calibrate(images, batch_size=2, num_workers=2) == model.calibrate(images, batch_size=2)
    with pytest.raises(ImageLoadError, match="missing.png"):
        model.predict([IMAGE_A, "missing.png"], num_workers=2)
    with pytest.raises(InvalidInputError, match="num_workers"):
        model.predict(IMAGE_A, num_workers=-1)


def test_patch_embedding_as_one_matrix_product(tiny_clip):
    from anomalyclip.vision import patch_embedding_gemm

    conv = tiny_clip.visual.conv1
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    expected = conv(x).flatten(2).transpose(1, 2)
    got = patch_embedding_gemm(conv, x)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


@pytest.mark.parametrize("shape", [(2, 518, 518), (1, 9, 5), (2, 40, 70)])
def test_blur_as_matrix_products_equals_scipy(shape):
    from scipy.ndimage import gaussian_filter

    from anomalyclip.scoring import gaussian_blur, gaussian_blur_matmul

    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    expected = np.stack([gaussian_filter(m, 4) for m in maps.numpy()])
    got = gaussian_blur_matmul(maps, 4)
    assert got.dtype == torch.float32 and got.shape == maps.shape
    assert np.abs(got.numpy() - expected).max() < 1e-5
    assert float((got - gaussian_blur(maps, 4)).abs().max()) < 1e-5
    assert torch.equal(gaussian_blur_matmul(maps, 0), maps)
