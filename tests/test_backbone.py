"""The backbone's activation: OpenAI weights always run QuickGELU, also from a Hub config that
lacks the flag (open_clip applies its rule only to pretrained tags, not to ``hf-hub:`` ids); an
explicit choice wins and a disagreement with open_clip's registry is logged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from anomalyclip import AnomalyCLIP
from anomalyclip.backbone import registry_quick_gelu, resolve_quick_gelu, uses_quick_gelu
from anomalyclip.config import DEFAULT_BACKBONE

from .conftest import TINY_CLIP, TINY_CLIP_REF, _put_in_hf_cache

OPENAI_REPO = "timm/vit_large_patch14_clip_336.openai"


@pytest.fixture
def openai_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache where ``timm/vit_large_patch14_clip_336.openai`` (the paper's
    backbone) holds the tiny CLIP with an ``open_clip_config.json`` WITHOUT ``quick_gelu``."""
    from huggingface_hub import constants

    config = json.loads((TINY_CLIP / "open_clip_config.json").read_text())
    del config["model_cfg"]["quick_gelu"]
    no_flag = tmp_path / "open_clip_config.json"
    no_flag.write_text(json.dumps(config))
    cache = tmp_path / "hf-cache"
    _put_in_hf_cache(
        cache,
        OPENAI_REPO,
        {"open_clip_config.json": no_flag, "open_clip_model.safetensors": TINY_CLIP / "open_clip_model.safetensors"},
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_registry_knows_which_hub_repos_are_quick_gelu():
    assert DEFAULT_BACKBONE == f"hf-hub:{OPENAI_REPO}"
    assert registry_quick_gelu(DEFAULT_BACKBONE) is True
    assert registry_quick_gelu("hf-hub:timm/vit_base_patch16_clip_224.openai") is True
    assert registry_quick_gelu("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K") is False  # listed, GELU
    assert registry_quick_gelu("hf-hub:some-org/unknown-clip") is None
    assert registry_quick_gelu("hf-hub:some-org/my_copy_of_vit_b16.openai") is True  # timm's naming
    assert registry_quick_gelu(TINY_CLIP_REF) is None


def test_resolution_rule_and_logged_disagreements(caplog):
    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        assert resolve_quick_gelu(DEFAULT_BACKBONE, None, None) is True  # the flag is missing
        assert resolve_quick_gelu(DEFAULT_BACKBONE, None, True) is True
        assert _warnings(caplog) == []
        assert resolve_quick_gelu(DEFAULT_BACKBONE, None, False) is True  # registry over the Hub config
        assert "says GELU" in _warnings(caplog)[-1]
        assert resolve_quick_gelu(DEFAULT_BACKBONE, False, True) is False  # explicit wins
        assert "runs GELU as asked" in _warnings(caplog)[-1]
        caplog.clear()
        assert resolve_quick_gelu(TINY_CLIP_REF, None, True) is True  # unknown to the registry: its config
        assert resolve_quick_gelu(TINY_CLIP_REF, None, None) is False
        assert resolve_quick_gelu(TINY_CLIP_REF, False, True) is False
        assert _warnings(caplog) == []


def test_openai_hub_backbone_without_the_flag_runs_quick_gelu(openai_hub_cache, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        model = AnomalyCLIP.from_backbone(device="cpu", image_size=112, seed=0)  # the default backbone
    assert _warnings(caplog) == []
    assert uses_quick_gelu(model.clip) and model.config.quick_gelu is True
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quick_gelu"] is True
    reloaded = AnomalyCLIP.from_pretrained(tmp_path / "saved", device="cpu")
    assert uses_quick_gelu(reloaded.clip)


def test_explicit_gelu_wins_and_the_disagreement_is_logged(openai_hub_cache, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        model = AnomalyCLIP.from_backbone(DEFAULT_BACKBONE, quick_gelu=False, device="cpu", image_size=112, seed=0)
    assert not uses_quick_gelu(model.clip) and model.config.quick_gelu is False
    assert any(OPENAI_REPO in m and "runs GELU as asked" in m for m in _warnings(caplog))
    model.save_pretrained(tmp_path / "gelu")
    assert json.loads((tmp_path / "gelu" / "config.json").read_text())["quick_gelu"] is False

    # A saved config is an explicit choice too: it is kept (the prompts were trained with it), warned about,
    # and from_pretrained(quick_gelu=...) overrides it.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        reloaded = AnomalyCLIP.from_pretrained(tmp_path / "gelu", device="cpu")
    assert not uses_quick_gelu(reloaded.clip) and any("runs GELU as asked" in m for m in _warnings(caplog))
    fixed = AnomalyCLIP.from_pretrained(tmp_path / "gelu", device="cpu", quick_gelu=True)
    assert uses_quick_gelu(fixed.clip) and fixed.config.quick_gelu is True
