"""save_pretrained / from_pretrained (local and through a real offline Hugging Face cache), push_to_hub,
strict prompt loading, and config validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, CheckpointError, InvalidInputError, WeightsNotFoundError
from anomalyclip import ops, vision

from .conftest import IMAGE_A


def _same_outputs(m1: AnomalyCLIP, m2: AnomalyCLIP) -> None:
    px = m1.preprocess(IMAGE_A)
    with torch.inference_mode():
        o1, o2 = m1(px), m2(px)
    assert torch.equal(o1.scores, o2.scores)
    assert torch.equal(o1.anomaly_maps, o2.anomaly_maps)


def test_save_load_round_trip(golden_model, tmp_path):
    out = golden_model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    tensors = load_file(str(out / "model.safetensors"))
    assert sorted(tensors) == ["ctx_anomalous", "ctx_normal", "deep_prompts"]  # only the prompts
    assert tensors["deep_prompts"].shape == (8, 4, 64)
    config = json.loads((out / "config.json").read_text())
    assert config["format_version"] == 3 and config["quick_gelu"] is True
    assert config["thresholds"] is None and config["trained_on"] is None
    assert list(config) == sorted(config)  # sorted keys
    loaded = AnomalyCLIP.from_pretrained(out, device="cpu")
    assert loaded.config == golden_model.config
    _same_outputs(golden_model, loaded)


def test_overrides_on_load(golden_model, tmp_path):
    golden_model.save_pretrained(tmp_path)
    loaded = AnomalyCLIP.from_pretrained(tmp_path, device="cpu", image_size=224, feature_layers=[6, 24])
    assert loaded.config.image_size == 224 and loaded.config.feature_layers == (6, 24)
    out = loaded(loaded.preprocess(IMAGE_A))
    assert out.anomaly_maps.shape == (1, 224, 224) and sorted(out.patch_features) == [6, 24]
    with pytest.raises(InvalidInputError, match="multiple of the patch size"):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu", image_size=500)
    with pytest.raises(InvalidInputError, match="feature_layers"):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu", feature_layers=[25])


def test_save_is_atomic_and_keeps_existing_files_on_failure(golden_model, tmp_path, monkeypatch):
    golden_model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("anomalyclip.model.persistence.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        golden_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_strict_prompt_loading(golden_model, tmp_path):
    golden_model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))

    save_file({k: v for k, v in tensors.items() if k != "deep_prompts"}, str(weights))
    with pytest.raises(CheckpointError, match=r"missing keys \['deep_prompts'\]"):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu")

    save_file({**tensors, "extra": torch.zeros(1)}, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra'\]"):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu")

    save_file({**tensors, "ctx_normal": torch.zeros(12, 65)}, str(weights))
    with pytest.raises(CheckpointError, match=r"'ctx_normal' has shape \[12, 65\], expected \[12, 64\]"):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu")

    save_file({**tensors, "ctx_normal": torch.full((12, 64), float("nan"))}, str(weights))
    with pytest.raises(CheckpointError, match="finite"):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu")

    weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu")


def test_config_validation(golden_model, tmp_path):
    golden_model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    good = json.loads(config_file.read_text())

    for change, message in [
        ({"surprise": 1}, r"unknown keys \['surprise'\]"),
        ({"format_version": 99}, "newer than this library supports"),
        ({"format_version": "2"}, "format_version must be a positive int, got '2'"),
        ({"format_version": 1}, r"unknown keys \['threshold_mode', 'thresholds', 'trained_on'\] for format_version 1"),
        ({"text_width": 768}, "text_width: config 768 vs backbone 64"),
        ({"dpam_mode": "xx"}, "config.json: dpam_mode must be one of"),
        ({"sigma": "4"}, r"config.json: sigma must be a number, got '4' \(str\)"),
        ({"feature_layers": [24.0]}, r"config.json: feature_layers must hold ints"),
        ({"thresholds": {"image": "high"}}, r"config.json: thresholds\['image'\] must be a finite number"),
    ]:
        config_file.write_text(json.dumps({**good, **change}))
        with pytest.raises(CheckpointError, match=message):  # a bad file is a checkpoint problem, whatever the field
            AnomalyCLIP.from_pretrained(tmp_path, device="cpu")
    config_file.write_text(json.dumps({k: v for k, v in good.items() if k != "format_version"}))
    with pytest.raises(CheckpointError, match="format_version"):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu")
    config_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu")


def test_recorded_activation_is_enforced(golden_model, tmp_path):
    """The config's quick_gelu decides the activation, whatever the backbone's own config says."""
    from anomalyclip.backbone import uses_quick_gelu

    golden_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quick_gelu": False}))
    gelu_model = AnomalyCLIP.from_pretrained(tmp_path, device="cpu")
    assert uses_quick_gelu(golden_model.clip) and not uses_quick_gelu(gelu_model.clip)
    with torch.inference_mode():
        assert not torch.allclose(golden_model.encode_text(), gelu_model.encode_text(), atol=1e-4)


def test_config_json_round_trip():
    config = AnomalyCLIPConfig(feature_layers=(6, 12, 18, 24), extra={"epochs": 3})
    assert AnomalyCLIPConfig.from_dict(json.loads(config.to_json())) == config
    assert config.first_dpam_layer == 6 and config.n_deep_prompts == 8


def test_from_pretrained_bad_names(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        AnomalyCLIP.from_pretrained(tmp_path)
    with pytest.raises(InvalidInputError, match="not a directory, a preset"):
        AnomalyCLIP.from_pretrained(str(tmp_path / "missing" / "deeper" / "dir"))
    with pytest.raises(InvalidInputError, match="string or path"):
        AnomalyCLIP.from_pretrained(42)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- Hugging Face Hub
def test_from_pretrained_through_hf_cache(hf_cache, golden_model):
    model = AnomalyCLIP.from_pretrained("test-org/anomalyclip-tiny", device="cpu")
    assert model.config.backbone == "hf-hub:test-org/tiny-clip"
    _same_outputs(golden_model, model)
    # An explicit cache_dir works as well as HF_HUB_CACHE.
    again = AnomalyCLIP.from_pretrained("test-org/anomalyclip-tiny", device="cpu", cache_dir=hf_cache)
    _same_outputs(golden_model, again)


def test_offline_hub_miss_is_a_clear_error(hf_cache):
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE=1 is set") as info:
        AnomalyCLIP.from_pretrained("test-org/not-cached", device="cpu")
    assert "hf download test-org/not-cached" in str(info.value)


def test_offline_backbone_miss_is_a_clear_error(hf_cache, golden_model, tmp_path):
    golden_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["backbone"] = "hf-hub:timm/vit_large_patch14_clip_336.openai"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsNotFoundError, match="timm/vit_large_patch14_clip_336.openai"):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu")


def test_text_features_cache_follows_prompt_changes(fresh_model):
    with torch.no_grad():
        first = fresh_model.encode_text().clone()
        assert fresh_model.encode_text() is fresh_model.encode_text()  # cached
        fresh_model.prompts.ctx_anomalous.add_(0.5)
        changed = fresh_model.encode_text()
    assert not torch.allclose(first, changed)


def test_bfloat16_model_runs_close_to_float32(golden_model, tmp_path):
    golden_model.save_pretrained(tmp_path)
    m32 = AnomalyCLIP.from_pretrained(tmp_path, device="cpu", image_size=224)
    m16 = AnomalyCLIP.from_pretrained(tmp_path, device="cpu", image_size=224, dtype="bfloat16")
    assert m16.dtype == torch.bfloat16 and m32.dtype == torch.float32
    px = m32.preprocess(IMAGE_A)
    with torch.inference_mode():
        o32, o16 = m32(px), m16(px)
    assert o16.scores.dtype == torch.float32 and o16.anomaly_maps.dtype == torch.float32
    assert (o16.scores - o32.scores).abs().max() < 0.02
    assert (o16.anomaly_maps - o32.anomaly_maps).abs().max() < 0.1
    with pytest.raises(InvalidInputError, match="Unknown dtype"):
        AnomalyCLIP.from_pretrained(tmp_path, device="cpu", dtype="int8")
    with pytest.raises(InvalidInputError, match="Unknown device"):
        AnomalyCLIP.from_pretrained(tmp_path, device="gpu0")


@pytest.fixture
def cpu_matmul_policy():
    """Restores the process-wide CPU low-precision matmul policy after the test."""
    previous = vision.get_cpu_low_precision_matmul()
    yield vision.set_cpu_low_precision_matmul
    vision.set_cpu_low_precision_matmul(previous)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_matmul_policies(golden_model, tmp_path, cpu_matmul_policy, dtype):
    golden_model.save_pretrained(tmp_path)
    m32 = AnomalyCLIP.from_pretrained(tmp_path, device="cpu", image_size=224)
    low = AnomalyCLIP.from_pretrained(tmp_path, device="cpu", image_size=224, dtype=dtype)
    px = m32.preprocess(IMAGE_A)
    probe = torch.empty(0, dtype=dtype)
    for policy, arithmetic in (("float32", torch.float32), ("native", None)):
        assert cpu_matmul_policy(policy) in ("auto", "native", "float32")
        assert vision.get_cpu_low_precision_matmul() == policy
        assert ops.matmul_dtype(probe) is arithmetic
        with torch.inference_mode():
            o32, o_low = m32(px), low(px)
        assert (o_low.scores - o32.scores).abs().max() < 0.02, policy
        assert (o_low.anomaly_maps - o32.anomaly_maps).abs().max() < 0.1, policy
    assert ops.matmul_dtype(torch.empty(0)) is None  # float32 weights are never touched
    with pytest.raises(InvalidInputError, match="auto, native, float32"):
        cpu_matmul_policy("fp32")
    assert vision.get_cpu_low_precision_matmul() == "native"  # a refused value changes nothing


def test_auto_device_prefers_accelerators(monkeypatch):
    from anomalyclip.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(None).type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device(None).type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None).type == "cuda"
