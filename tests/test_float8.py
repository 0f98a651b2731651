"""float8 (anomalyclip.float8) on the CPU: the quantization and ``torch._scaled_mm`` arithmetic
against a float64 dequantized reference (PyTorch has float8 dtypes and ``_scaled_mm`` on the CPU),
and the clear error where a model asks for float8 without float8 tensor cores. The GPU forward's
parity is in tests/test_cuda.py (marker ``cuda``)."""

from __future__ import annotations

import pytest
import torch

from anomalyclip import AnomalyCLIP, float8, ops
from anomalyclip.errors import InvalidInputError
from anomalyclip.runtime import auto_dtype, resolve_precision

from .conftest import OFFICIAL_PTH, TINY_CLIP_REF

needs_float8 = pytest.mark.skipif(
    not (hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")), reason="this PyTorch has no float8"
)


def _operands(seed: int = 0, m: int = 37, k: int = 96, n: int = 64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[3] *= 1e-5  # a row of small values next to large ones (per-row scales keep its precision)
    weight = torch.randn(n, k, generator=gen) / 8
    bias = torch.randn(n, generator=gen)
    return x, weight, bias


@needs_float8
def test_quantize_rows_maps_each_rows_largest_magnitude_to_448():
    x, _, _ = _operands()
    q, scale = float8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (37, 1) and scale.dtype == torch.float32
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((37,), float8.E4M3_MAX))
    back = q.float() * scale
    # e4m3: 3 mantissa bits, relative rounding at most 2^-4 of each value (normal range)
    rel = ((back - x).abs() / x.abs().amax(dim=1, keepdim=True)).max()
    assert rel <= 2.0**-4
    q_t, scale_t = float8.quantize_rows(x, rowwise=False)
    assert scale_t.shape == () and float(q_t.float().abs().max()) == float8.E4M3_MAX


@needs_float8
@pytest.mark.parametrize("rowwise", [True, False])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (1.702, 1.702), (1 / 1.702, 1.0)])
def test_scaled_mm_equals_the_dequantized_reference(rowwise, alpha, beta):
    x, weight, bias = _operands()
    got = float8.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), alpha=alpha, beta=beta, rowwise=rowwise)
    assert got.dtype == torch.bfloat16 and got.shape == (37, 64)
    xq, xs = float8.quantize_rows(x.bfloat16(), rowwise=rowwise)
    wq, ws = float8.quantize_rows(weight.bfloat16(), rowwise=rowwise)
    product = alpha * ((xq.double() * xs.double()) @ (wq.double() * ws.double()).t())
    shift = beta * bias.bfloat16().double()
    # the same float8 operands: only the accumulation and the bfloat16 rounding of the product and
    # of the sum with the bias differ (relative 2^-9 each, of the summands' magnitude)
    err = (got.double() - (product + shift)).abs()
    assert float((err / (product.abs() + shift.abs())).max()) < 2**-7


@needs_float8
def test_float8_product_error_against_float32_and_per_row_scales():
    x, weight, bias = _operands(1)
    exact = x.double() @ weight.double().t() + bias.double()
    rowwise = float8.reference_linear(x, weight, bias, rowwise=True).double()
    tensorwise = float8.reference_linear(x, weight, bias, rowwise=False).double()
    scale = exact.abs().max()
    assert float((rowwise - exact).abs().max() / scale) < 0.05  # a few e4m3 roundings, averaged over K = 96
    # the small row: per-row scaling keeps it accurate; one scale for the whole tensor crushes it
    small = exact[3] - bias.double()
    row_err = float(((rowwise[3] - bias.double()) - small).abs().max() / small.abs().max())
    tensor_err = float(((tensorwise[3] - bias.double()) - small).abs().max() / small.abs().max())
    assert row_err < 0.1 and tensor_err > 0.5  # below e4m3's smallest subnormal in one scale: lost


@needs_float8
def test_cached_float8_weights_follow_the_weight():
    x, weight, _ = _operands(2)
    weight = weight.clone()
    first = float8.linear(x, weight, None, out_dtype=torch.float32)
    weight.mul_(2.0)
    second = float8.linear(x, weight, None, out_dtype=torch.float32)
    torch.testing.assert_close(second, 2 * first, rtol=1e-6, atol=1e-6)  # powers of two scale exactly


def test_float8_is_refused_on_the_cpu_with_the_fix():
    with pytest.raises(InvalidInputError, match=r"compute capability 8\.9.*bfloat16"):
        float8.check_float8_supported("cpu")
    assert not float8.float8_supported("cpu")
    with pytest.raises(InvalidInputError, match="float8"):
        AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=TINY_CLIP_REF, device="cpu", dtype="float8")


def test_set_float8_refuses_a_cpu_model_and_state_dict_is_unchanged(fresh_model):
    from anomalyclip.vision import set_float8, uses_float8

    keys = list(fresh_model.state_dict())
    with pytest.raises(InvalidInputError, match="float8"):
        set_float8(fresh_model.clip.visual)
    assert not uses_float8(fresh_model.clip.visual) and list(fresh_model.state_dict()) == keys


def test_float8_context_leaves_cpu_products_alone():
    x, weight, bias = _operands(3)
    with torch.no_grad(), ops.float8_matmuls():
        inside = ops.linear(x, weight, bias)
    with torch.no_grad():
        outside = ops.linear(x, weight, bias)
    assert torch.equal(inside, outside)


def test_auto_dtype_is_float32_on_the_cpu():
    assert auto_dtype(torch.device("cpu")) == torch.float32
    assert resolve_precision("auto", torch.device("cpu")) == (torch.float32, False)
    assert resolve_precision("float8", torch.device("cuda")) == (torch.bfloat16, True)
    model = AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=TINY_CLIP_REF, device="cpu", dtype="auto")
    assert model.dtype == torch.float32
