"""The compute dtype belongs to the frozen CLIP only: the learned prompts stay float32 whatever
``model.to(...)`` is asked, so a low-precision model saves and trains its prompts unrounded."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from anomalyclip import AnomalyCLIP

from .conftest import IMAGE_A, OFFICIAL_PTH, TINY_CLIP_REF


@pytest.fixture
def float32_prompts(golden_model) -> dict[str, torch.Tensor]:
    """Prompts with bits below bfloat16's precision (the golden ones are drawn from normal(0, 0.5))."""
    tensors = {k: v.detach().clone() for k, v in golden_model.prompts.state_dict().items()}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in tensors.values())  # bf16 would round them
    return tensors


@pytest.mark.parametrize("cast", ["to_dtype", "to_positional", "bfloat16", "half"])
def test_low_precision_model_keeps_float32_prompts_and_saves_them_bit_for_bit(float32_prompts, tmp_path, cast):
    model = AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=TINY_CLIP_REF, device="cpu")
    model.load_prompts(float32_prompts)
    if cast == "to_dtype":
        model.to(dtype=torch.bfloat16)
    elif cast == "to_positional":
        model.to("cpu", torch.bfloat16)
    elif cast == "bfloat16":
        model.bfloat16()
    else:
        model.half()
    low = torch.bfloat16 if cast != "half" else torch.float16
    assert model.dtype == low and model.clip.visual.conv1.weight.dtype == low
    assert all(p.dtype == torch.float32 for p in model.prompts.parameters())
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    for key, original in float32_prompts.items():
        assert saved[key].dtype == torch.float32
        assert saved[key].numpy().tobytes() == original.numpy().tobytes(), key


def test_from_pretrained_in_bfloat16_keeps_the_saved_prompts(golden_model, tmp_path):
    golden_model.save_pretrained(tmp_path)
    model = AnomalyCLIP.from_pretrained(tmp_path, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    for key, value in golden_model.prompts.state_dict().items():
        assert torch.equal(model.prompts.state_dict()[key], value), key
    # and it runs: the prompts are cast to the compute dtype where they are used
    with torch.inference_mode():
        out = model(model.preprocess(IMAGE_A))
    assert torch.isfinite(out.scores).all()


def test_device_moves_still_apply_to_the_prompts():
    from anomalyclip.backbone import load_clip

    model = AnomalyCLIP.from_clip(load_clip(TINY_CLIP_REF), backbone=TINY_CLIP_REF, image_size=112, seed=0)
    model.to(torch.device("meta"), torch.bfloat16)
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in model.prompts.parameters())
    assert model.clip.visual.conv1.weight.device.type == "meta"
