"""The CPU linear kernels (anomalyclip.cpu_linear): oneDNN with packed weights equals the plain
``F.linear`` path to float32 rounding, is never used under autograd, follows the weights when they
change, and leaves the model's state untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalyclip import cpu_linear, ops
from anomalyclip.errors import InvalidInputError

from .conftest import IMAGE_A

pytestmark = pytest.mark.skipif(
    not cpu_linear.onednn_linear_available(torch.float32), reason="this PyTorch build has no oneDNN packed linear"
)


@pytest.fixture
def backend():
    """Set the backend for one test and restore the previous one afterwards."""
    previous = cpu_linear.get_cpu_linear_backend()
    yield cpu_linear.set_cpu_linear_backend
    cpu_linear.set_cpu_linear_backend(previous)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach the packed kernel."""
    calls = []
    real = cpu_linear._onednn

    def counted(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(cpu_linear, "_onednn", counted)
    return calls


def _reference(x, weight, bias, alpha=1.0, beta=1.0):
    """float64 ``beta * bias + alpha * x @ weight^T``."""
    out = alpha * (x.double() @ weight.double().t())
    return out + beta * bias.double() if bias is not None else out


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (1.702, 1.702), (1 / 1.702, 1.0)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_equals_the_plain_path_to_float32_rounding(backend, spy, alpha, beta, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 96, generator=gen)
    weight = torch.randn(160, 96, generator=gen) / 10
    bias = torch.randn(160, generator=gen) if with_bias else None
    expected = _reference(x, weight, bias, alpha, beta)
    backend("mkl")
    plain = ops.linear(x, weight, bias, alpha=alpha, beta=beta)
    assert spy == []
    backend("onednn")
    fast = ops.linear(x, weight, bias, alpha=alpha, beta=beta)
    assert len(spy) == 1 and fast.shape == plain.shape == (2, 37, 160) and fast.dtype == torch.float32
    scale = expected.abs().max().item()
    # both within float32 rounding of the float64 product (K = 96 terms)
    assert (plain.double() - expected).abs().max().item() < 1e-5 * scale
    assert (fast.double() - expected).abs().max().item() < 1e-5 * scale


def test_views_of_one_weight_are_packed_apart(backend, spy):
    """The last block's class-token query and key/value use slices of the one in-projection weight."""
    backend("onednn")
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(3 * 64, 64, generator=gen)
    x = torch.randn(5, 64, generator=gen)
    for part in (weight[:64], weight[64:], weight):
        torch.testing.assert_close(ops.linear(x, part, None), x @ part.t(), rtol=1e-5, atol=1e-5)
    assert len(spy) == 3


def test_packed_weights_follow_in_place_updates_and_new_data(backend):
    backend("onednn")
    gen = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(32, 48)
    x = torch.randn(7, 32, generator=gen)
    with torch.no_grad():
        first = ops.linear(x, layer.weight, layer.bias)
        layer.weight.mul_(2.0)  # in place: the version counter moves
        torch.testing.assert_close(ops.linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
        layer.weight.data = torch.randn(48, 32, generator=gen)  # new storage, as model.to(...) does
        torch.testing.assert_close(ops.linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(first, ops.linear(x, layer.weight, layer.bias))


def test_not_used_under_autograd_and_gradients_are_right(backend, spy):
    backend("onednn")
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 16, generator=gen, requires_grad=True)
    x = torch.randn(9, 16, generator=gen, requires_grad=True)
    out = ops.linear(x, weight, None, alpha=0.5)
    out.sum().backward()
    assert spy == []  # autograd recorded: the plain path
    torch.testing.assert_close(weight.grad, 0.5 * x.detach().sum(0, keepdim=True).expand(24, 16))
    with torch.no_grad():
        ops.linear(x, weight, None)
    with torch.inference_mode():
        ops.linear(x, weight, None)
    assert len(spy) == 2  # nothing recorded: the packed path


def test_not_used_under_forward_ad_or_autocast(backend, spy):
    import torch.autograd.forward_ad as fwAD

    backend("onednn")
    gen = torch.Generator().manual_seed(5)
    x, tangent = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    weight, bias = torch.randn(16, 8, generator=gen), torch.randn(16, generator=gen)
    with torch.no_grad(), fwAD.dual_level():
        out = ops.linear(fwAD.make_dual(x, tangent), weight, bias)
        jvp = fwAD.unpack_dual(out).tangent
    assert jvp is not None and (jvp.double() - tangent.double() @ weight.double().t()).abs().max().item() < 1e-5
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_onednn = ops.linear(x, weight, bias)
        backend("mkl")
        autocast_plain = ops.linear(x, weight, bias)
        backend("onednn")
    assert spy == [] and torch.equal(autocast_onednn, autocast_plain)  # autocast's bfloat16 product, not float32
    assert (autocast_plain - x @ weight.t() - bias).abs().max().item() > 1e-4
    with torch.inference_mode():
        ops.linear(x, weight, bias)
    assert len(spy) == 1


def test_auto_measures_once_per_shape_and_mkl_never_packs(backend, spy, monkeypatch):
    measured = []
    monkeypatch.setattr(cpu_linear, "_measure", lambda weight, bias: measured.append(tuple(weight.shape)) or True)
    monkeypatch.setattr(cpu_linear._SETTINGS, "choices", {})  # nothing measured yet in this process
    backend("auto")
    x = torch.randn(4, 8)
    with torch.no_grad():
        for _ in range(3):
            ops.linear(x, torch.randn(16, 8), None)
        ops.linear(x, torch.randn(12, 8), None)
    assert measured == [(16, 8), (12, 8)] and len(spy) == 4
    backend("mkl")
    with torch.no_grad():
        ops.linear(x, torch.randn(16, 8), None)
    assert len(spy) == 4
    backend("auto")  # back to auto: the shapes measured before are not measured again
    with torch.no_grad():
        ops.linear(x, torch.randn(16, 8), None)
    assert measured == [(16, 8), (12, 8)] and len(spy) == 5


def test_unknown_backend_is_refused_and_the_environment_is_read(backend, monkeypatch):
    with pytest.raises(InvalidInputError, match="onednn"):
        backend("fast")
    monkeypatch.setenv(cpu_linear.ENV_VAR, "mkl")
    monkeypatch.setattr(cpu_linear._SETTINGS, "backend", None)
    assert cpu_linear.get_cpu_linear_backend() == "mkl"


def test_model_forward_equal_and_state_dict_unchanged(golden_model, backend):
    from anomalyclip.preprocessing import preprocess_image

    pixels = preprocess_image(str(IMAGE_A), golden_model.config.image_size)[None]
    before = {k: v.clone() for k, v in golden_model.state_dict().items()}
    backend("mkl")
    with torch.inference_mode():
        plain = golden_model(pixels)
    backend("onednn")
    with torch.inference_mode():
        fast = golden_model(pixels)
    after = golden_model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.layout != torch.strided for p in golden_model.parameters())
    torch.testing.assert_close(fast.scores, plain.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.anomaly_maps, plain.anomaly_maps, rtol=0, atol=1e-4)


def test_fused_silu_linear_equals_quick_gelu(backend, spy):
    """The MLP's first layer: 1.702 * QuickGELU(x W^T + b), the SiLU in oneDNN's epilogue."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 21, 48, generator=gen)
    weight = torch.randn(96, 48, generator=gen) / 7
    bias = torch.randn(96, generator=gen)
    pre = _reference(x, weight, bias)
    expected = 1.702 * pre * torch.sigmoid(1.702 * pre)
    for name, used in (("mkl", 0), ("onednn", 1)):
        backend(name)
        with torch.no_grad():
            got = ops.linear_silu(x, weight, bias, 1.702)
        assert len(spy) == used and got.shape == (3, 21, 96)
        assert (got.double() - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def test_traced_forward_uses_the_plain_operators(golden_model, backend, spy):
    """encode_image(traceable=True) (the ONNX export's forward) records no oneDNN packed op."""
    from anomalyclip.vision import encode_image

    backend("onednn")
    pixels = torch.zeros(1, 3, 112, 112)
    with torch.no_grad():
        encode_image(golden_model.clip.visual, pixels, feature_layers=(24,), dpam_layers=20, traceable=True)
        assert spy == []
        encode_image(golden_model.clip.visual, pixels, feature_layers=(24,), dpam_layers=20)
    assert spy  # the same forward, not traced: the packed path
