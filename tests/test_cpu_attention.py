"""The CPU attention kernels (anomalyclip.cpu_attention): the explicit per-head oneDNN form equals
fused SDPA and a float64 reference to float32 rounding, is used only where it applies (inference,
float32, enough query rows), is chosen by measurement once per shape, and keeps the golden outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalyclip import cpu_attention, cpu_linear, kernel_choice, ops
from anomalyclip.errors import InvalidInputError

from .conftest import IMAGE_A

needs_onednn = pytest.mark.skipif(
    not cpu_linear.onednn_linear_available(torch.float32), reason="this PyTorch build has no oneDNN linear"
)


@pytest.fixture
def backend(monkeypatch):
    """Set the backend for one test (nothing measured yet) and restore the previous one afterwards."""
    monkeypatch.setattr(cpu_attention._SETTINGS, "choices", {})
    previous = cpu_attention.get_cpu_attention_backend()
    yield cpu_attention.set_cpu_attention_backend
    cpu_attention.set_cpu_attention_backend(previous)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the explicit form."""
    calls = []
    real = cpu_attention.explicit_attention

    def counted(q, k, v):
        calls.append(tuple(q.shape))
        return real(q, k, v)

    monkeypatch.setattr(cpu_attention, "explicit_attention", counted)
    return calls


def _qkv(batch=2, heads=3, rows=80, keys=80, dim=16, seed=0):
    """q, k, v as strided views of one projection, as ``ops.qkv_heads`` returns them."""
    gen = torch.Generator().manual_seed(seed)
    if rows == keys:
        qkv = torch.randn(batch, rows, 3, heads, dim, generator=gen).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]
    q = torch.randn(batch, rows, heads, dim, generator=gen).transpose(1, 2)
    kv = torch.randn(batch, keys, 2, heads, dim, generator=gen).permute(2, 0, 3, 1, 4)
    return q, kv[0], kv[1]


def _reference(q, k, v):
    """float64 ``softmax(q k^T / sqrt(d)) v``."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


@needs_onednn
@pytest.mark.parametrize("rows,keys", [(80, 80), (70, 130)])
def test_explicit_form_equals_sdpa_and_a_float64_reference(rows, keys):
    q, k, v = _qkv(rows=rows, keys=keys)
    with torch.inference_mode():
        explicit = cpu_attention.explicit_attention(q, k, v)
        fused = F.scaled_dot_product_attention(q, k, v)
    assert explicit.shape == fused.shape == (2, 3, rows, 16)
    assert (explicit.double() - _reference(q, k, v)).abs().max().item() < 1e-5
    torch.testing.assert_close(explicit, fused, rtol=0, atol=1e-5)
    assert ops.merge_heads(explicit).shape == (2, rows, 48)


@needs_onednn
def test_row_blocks_of_long_sequences_give_the_same_result(monkeypatch):
    q, k, v = _qkv(batch=1, rows=100, keys=100)
    with torch.inference_mode():
        whole = cpu_attention.explicit_attention(q, k, v)
        monkeypatch.setattr(cpu_attention, "SCORE_BLOCK_ELEMENTS", 30 * 100)  # blocks of 30, 30, 30, 10 rows
        blocked = cpu_attention.explicit_attention(q, k, v)
    assert (blocked.double() - _reference(q, k, v)).abs().max().item() < 1e-5
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-6)


@needs_onednn
def test_used_only_where_it_applies(backend, spy):
    backend("onednn")
    q, k, v = _qkv()
    with torch.inference_mode():
        ops.sdpa(q, k, v)  # float32, 80 query rows: the explicit form
        ops.sdpa(q[:, :, :1], k, v)  # a class-token query: fused
        ops.sdpa(q, k, v, causal=True)  # causal (the text tower): fused
        ops.sdpa(q.double(), k.double(), v.double())  # not float32: fused
        with ops.plain_matmuls():  # the export's forward: fused
            ops.sdpa(q, k, v)
    assert spy == [(2, 3, 80, 16)]
    backend("sdpa")
    with torch.inference_mode():
        ops.sdpa(q, k, v)
    assert len(spy) == 1


@needs_onednn
def test_shapes_it_does_not_take_stay_fused(backend, spy):
    """Broadcast batch or heads, values of another head size, no keys: as fused SDPA computes them."""
    backend("onednn")
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 80, 16, generator=gen)
    cases = [
        (torch.randn(1, 3, 50, 16, generator=gen), torch.randn(1, 3, 50, 16, generator=gen)),  # batch broadcast
        (torch.randn(2, 1, 50, 16, generator=gen), torch.randn(2, 1, 50, 16, generator=gen)),  # heads broadcast
        (torch.randn(2, 3, 50, 16, generator=gen), torch.randn(2, 3, 50, 8, generator=gen)),  # v head size 8
        (torch.randn(2, 3, 0, 16), torch.randn(2, 3, 0, 16)),  # no keys
    ]
    with torch.inference_mode():
        for k, v in cases:
            torch.testing.assert_close(ops.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    assert spy == []


@needs_onednn
@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_not_used_under_autocast_forward_ad_or_tracing(backend, spy):
    backend("onednn")
    q, k, v = _qkv()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, fused = ops.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == fused.dtype == torch.bfloat16 and spy == []  # autocast's dtype, as fused
    import torch.autograd.forward_ad as fwAD

    with torch.no_grad(), fwAD.dual_level():
        try:
            out = ops.sdpa(fwAD.make_dual(q, torch.randn_like(q)), k, v)
        except NotImplementedError:  # the fused CPU kernel's own answer in this PyTorch (no silent loss)
            pass
        else:
            assert fwAD.unpack_dual(out).tangent is not None
    assert spy == []
    with torch.no_grad():
        traced = torch.jit.trace(lambda q, k, v: ops.sdpa(q, k, v), (q, k, v), check_trace=False)
    assert spy == [] and "mkldnn" not in str(traced.graph)
    with torch.inference_mode():
        ops.sdpa(q, k, v)
    assert spy == [(2, 3, 80, 16)]  # the same call outside those contexts: the explicit form


@needs_onednn
def test_not_used_under_autograd_and_gradients_are_right(backend, spy):
    backend("onednn")
    q, k, v = (t.detach().clone().requires_grad_() for t in _qkv(batch=1, heads=2, rows=64, keys=64, dim=8))
    out = ops.sdpa(q, k, v)
    out.square().sum().backward()
    assert spy == []
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    _reference(qd, kd, vd).square().sum().backward()
    for got, want in ((q, qd), (k, kd), (v, vd)):
        assert (got.grad.double() - want.grad).abs().max().item() < 1e-5


@needs_onednn
@pytest.mark.parametrize("explicit_wins", [True, False])
def test_auto_measures_once_per_shape_and_keeps_the_faster(backend, spy, monkeypatch, explicit_wins):
    measured = []
    monkeypatch.setattr(
        cpu_attention, "_explicit_is_faster", lambda q, k, v: measured.append(tuple(q.shape)) or explicit_wins
    )
    backend("auto")
    q, k, v = _qkv()
    q2, k2, v2 = _qkv(rows=96, keys=96)
    with torch.inference_mode():
        for _ in range(3):
            ops.sdpa(q, k, v)
        ops.sdpa(q[:1], k[:1], v[:1])  # another batch size, same shape otherwise: not measured again
        ops.sdpa(q2, k2, v2)
        backend("sdpa")
        backend("auto")  # switching back keeps the measurements
        ops.sdpa(q, k, v)
    assert measured == [(2, 3, 80, 16), (2, 3, 96, 16)]
    assert len(spy) == (6 if explicit_wins else 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)  # another thread count: measured again
        with torch.inference_mode():
            ops.sdpa(q, k, v)
    finally:
        torch.set_num_threads(threads)
    cpu_attention.clear_auto_choices()  # forgotten: measured again
    with torch.inference_mode():
        ops.sdpa(q, k, v)
    assert measured == [(2, 3, 80, 16), (2, 3, 96, 16), (2, 3, 80, 16), (2, 3, 80, 16)]
    assert set(cpu_attention.auto_choices().values()) == {"onednn" if explicit_wins else "sdpa"}


@needs_onednn
def test_the_probe_times_both_forms_on_one_sample(monkeypatch):
    """``_explicit_is_faster`` compares the forms' times with a 5 % margin for the explicit one."""
    q, k, v = _qkv()
    seen = []
    real = cpu_attention.explicit_attention
    monkeypatch.setattr(cpu_attention, "explicit_attention", lambda q, k, v: seen.append(q.shape[0]) or real(q, k, v))
    for fused_s, explicit_s, expected in ((1.0, 0.9, True), (1.0, 0.97, False), (1.0, 1.5, False)):
        times = iter([fused_s, explicit_s] * cpu_attention._PROBE_REPEATS)
        monkeypatch.setattr(kernel_choice, "_seconds", lambda fn: fn() is None or next(times))
        with torch.inference_mode():
            assert cpu_attention._explicit_is_faster(q, k, v) is expected
    assert seen and set(seen) == {1}  # on the first sample only


def test_unknown_backend_is_refused_and_the_environment_is_read(backend, monkeypatch):
    with pytest.raises(InvalidInputError, match="sdpa"):
        backend("fast")
    monkeypatch.setenv(cpu_attention.ENV_VAR, "sdpa")
    monkeypatch.setattr(cpu_attention._SETTINGS, "backend", None)
    assert cpu_attention.get_cpu_attention_backend() == "sdpa"
    monkeypatch.setenv(cpu_attention.ENV_VAR, "quick")
    monkeypatch.setattr(cpu_attention._SETTINGS, "backend", None)
    assert cpu_attention.get_cpu_attention_backend() == "auto"


@needs_onednn
def test_model_forward_equal_with_either_kernel(golden_model, backend, spy):
    """The golden model at 518 px (1,370 tokens): both attention paths of every DPAM block."""
    pixels = golden_model.preprocess([IMAGE_A])
    backend("sdpa")
    with torch.inference_mode():
        fused = golden_model(pixels)
    assert spy == []
    backend("onednn")
    with torch.inference_mode():
        explicit = golden_model(pixels)
    assert spy and all(shape[2] == 1370 for shape in spy)
    torch.testing.assert_close(explicit.scores, fused.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(explicit.anomaly_maps, fused.anomaly_maps, rtol=0, atol=1e-4)
