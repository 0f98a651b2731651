"""References record the weights fingerprint of their backbone; another backbone refuses them."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from anomalyclip import AnomalyCLIP, InvalidInputError
from anomalyclip.backbone import backbone_fingerprint
from anomalyclip.references import REFERENCES_NAME, ReferenceMemory

from .conftest import IMAGE_A, IMAGE_B, OFFICIAL_PTH, TINY_CLIP, TINY_CLIP_REF

SIZE = 112


@pytest.fixture(scope="module")
def other_clip_dir(tmp_path_factory):
    """The tiny CLIP with another vision tower (each parameter re-drawn at its own scale; the text
    tower kept, which the prompts are checked against), in open_clip's local-dir layout."""
    folder = tmp_path_factory.mktemp("other-clip")
    shutil.copyfile(TINY_CLIP / "open_clip_config.json", folder / "open_clip_config.json")
    tensors = load_file(str(TINY_CLIP / "open_clip_model.safetensors"))
    generator = torch.Generator().manual_seed(5)
    other = {
        k: (torch.randn(v.shape, generator=generator) * (v.float().std() if v.numel() > 1 else 1.0)).to(v.dtype)
        if v.is_floating_point() and k.startswith("visual.")
        else v
        for k, v in tensors.items()
    }
    save_file(other, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def other_clip(other_clip_dir):
    from anomalyclip.backbone import load_clip

    return load_clip(f"local-dir:{other_clip_dir}")


def _model(clip, backbone):
    return AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=clip, backbone=backbone, device="cpu", image_size=SIZE)


def test_fingerprint_is_one_per_backbone_in_every_dtype(tiny_clip, other_clip):
    fp = backbone_fingerprint(tiny_clip)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert backbone_fingerprint(copy.deepcopy(tiny_clip).half()) == fp
    assert backbone_fingerprint(copy.deepcopy(tiny_clip).to(torch.bfloat16)) == fp
    assert backbone_fingerprint(copy.deepcopy(tiny_clip)) == fp  # deterministic
    assert backbone_fingerprint(other_clip) != fp


def test_references_of_another_backbone_are_refused(tiny_clip, other_clip, other_clip_dir, tmp_path):
    ours = _model(tiny_clip, TINY_CLIP_REF)
    ours.add_references(IMAGE_B)
    assert ours.references.backbone_fingerprint == backbone_fingerprint(tiny_clip)
    other_ref = f"local-dir:{other_clip_dir}"
    theirs = _model(other_clip, other_ref)
    with pytest.raises(InvalidInputError, match=r"computed with backbone .*tiny-clip.*this model's backbone is .*other-clip"):
        theirs.references = ours.references
    assert theirs.references is None  # nothing attached

    # A profile whose config names another backbone than the one its references were computed with.
    profile = ours.save_pretrained(tmp_path / "profile")
    config = json.loads((profile / "config.json").read_text())
    config["backbone"] = other_ref
    (profile / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="clear_references"):
        AnomalyCLIP.from_pretrained(profile, device="cpu")


def test_memory_fingerprint_is_a_content_hash(tiny_clip, tmp_path):
    model = _model(tiny_clip, TINY_CLIP_REF)
    model.add_references(IMAGE_B)
    memory = model.references
    first = memory.fingerprint()
    loaded = ReferenceMemory.load(memory.save(tmp_path / REFERENCES_NAME))
    assert loaded.fingerprint() == first and loaded.backbone_fingerprint == memory.backbone_fingerprint
    model.add_references(IMAGE_A)
    assert model.references.fingerprint() != first


def test_old_references_without_a_fingerprint_load_with_one_warning(tiny_clip, tmp_path, caplog):
    model = _model(tiny_clip, TINY_CLIP_REF)
    model.add_references(IMAGE_B)
    memory = model.references
    meta = {k: v for k, v in memory.metadata().items() if k != "backbone_fingerprint"}
    profile = model.save_pretrained(tmp_path / "profile")
    save_file({f"layer_{k}": v.contiguous() for k, v in memory.memories.items()}, str(profile / REFERENCES_NAME), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        loaded = AnomalyCLIP.from_pretrained(profile, device="cpu")
        loaded.references = loaded.references  # attaching it again does not warn again
        loaded.predict(IMAGE_A)
    assert loaded.num_references == 1 and loaded.references.backbone_fingerprint is None
    assert caplog.text.count("no backbone fingerprint") == 1
