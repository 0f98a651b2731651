"""``anomalyclip.flops`` against PyTorch's own FLOP counter run over the actual forward.

``torch.utils.flop_counter.FlopCounterMode`` counts every matrix product the vision forward
really executes (convolution, addmm, mm; attention as bmm under the math SDPA backend, which the
counter can see into). The shape-based count must equal it part by part.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from anomalyclip import AnomalyCLIP, ops
from anomalyclip.flops import ModelDims, count_inference_flops

from .conftest import OFFICIAL_PTH, TINY_CLIP_REF

SIZE = 112


def _measured(model: AnomalyCLIP, batch: int) -> dict[str, int]:
    pixel_values = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    # plain_matmuls: count the math on aten's own ops (oneDNN's packed linear is not counted as addmm)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), ops.plain_matmuls(), FlopCounterMode(display=False) as counter:
        model.encode_image(pixel_values)
    return {str(op).removeprefix("aten."): n // batch for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("feature_layers", [(24,), (6, 12, 18, 24), (3,)])
def test_counts_match_the_executed_forward(tiny_clip, feature_layers):
    model = AnomalyCLIP.from_official_checkpoint(
        OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=SIZE,
        feature_layers=feature_layers,
    )
    measured = _measured(model, batch=2)
    dims = ModelDims.from_model(model)
    counted = count_inference_flops(dims)
    tokens = 1 + (SIZE // dims.patch_size) ** 2
    # "head" also counts the similarities to the two text features, which encode_image does not run.
    similarities = len(feature_layers) * 2 * 2 * tokens * dims.embed_dim + 2 * 2 * dims.embed_dim

    assert measured == {
        "convolution": counted["patch_embed"],
        "addmm": counted["qkv"] + counted["out_proj"] + counted["mlp"],
        "bmm": counted["attention"] + counted["attention_dpam"],
        "mm": counted["head"] - similarities,
    }
    assert counted["total"] == sum(v for k, v in counted.items() if k not in ("total", "text"))


def test_paper_setting_total_is_the_documented_figure():
    counted = count_inference_flops()  # ViT-L/14@336 at 518 px, DPAM in 19 blocks, layer 24
    assert round(counted["total"] / 1e9, 2) == 1180.03  # quoted in docs/benchmarks.md
    assert round(count_inference_flops(official_style=True)["total"] / 1e9, 2) == 1216.42
    assert count_inference_flops(image_size=336)["total"] < counted["total"]
    with pytest.raises(ValueError, match="multiple of patch_size"):
        count_inference_flops(image_size=500)
