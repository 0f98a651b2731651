"""Inspection profiles on the Hub: a push replaces every file the library owns (a stale
references file goes), a load takes the profile's files from one revision and never silently
drops references the config names (the fake Hub of tests/fakehub.py; a real offline cache)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from anomalyclip import AnomalyCLIP, CheckpointError, Thresholds, WeightsNotFoundError
from anomalyclip.references import REFERENCES_NAME

from .conftest import IMAGE_A, IMAGE_B, OFFICIAL_PTH, TINY_CLIP_REF, _put_in_hf_cache
from .fakehub import FakeHub

SIZE = 112
USER_README = "---\nlicense: apache-2.0\n---\n# Bottles\n\nOur notes.\n"


@pytest.fixture
def model(tiny_clip):
    return AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=SIZE)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    return FakeHub(tmp_path / "hub").install(monkeypatch)


def _profile(model) -> AnomalyCLIP:
    model.add_references(IMAGE_B)
    model.thresholds = Thresholds(image=0.7, pixel=2.5)
    return model


# ----------------------------------------------------------------------------- push (item 2)
def test_pushing_a_zero_shot_model_over_a_profile_removes_its_references(model, hub):
    hub.put("me/bottles", {"README.md": USER_README.encode(), "notes/line-3.txt": b"theirs"})
    _profile(model).push_to_hub("me/bottles")
    assert REFERENCES_NAME in hub.files("me/bottles")

    model.clear_references()
    model.thresholds = Thresholds(image=0.55, pixel=0.6)
    model.push_to_hub("me/bottles")
    files = hub.files("me/bottles")
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", "notes/line-3.txt"]
    assert files["README.md"].decode() == USER_README and files["notes/line-3.txt"] == b"theirs"  # theirs stay
    assert json.loads(files["config.json"])["references"] is None

    loaded = AnomalyCLIP.from_pretrained("me/bottles", device="cpu")
    assert loaded.num_references == 0 and loaded.thresholds == Thresholds(image=0.55, pixel=0.6)
    # The earlier revision is still the whole profile: its references with its thresholds.
    before = AnomalyCLIP.from_pretrained("me/bottles", revision="2", device="cpu")
    assert before.num_references == 1 and before.thresholds == Thresholds(image=0.7, pixel=2.5)
    assert torch.equal(before.references.memories[24], _reference_rows(model))


def _reference_rows(model):
    model.add_references(IMAGE_B)
    rows = model.references.memories[24]
    model.clear_references()
    return rows


def test_a_push_replaces_a_profile_with_a_profile(model, hub):
    _profile(model).push_to_hub("me/bottles")
    model.add_references(IMAGE_A)  # two references now
    model.thresholds = Thresholds(image=0.8, pixel=0.7)
    model.push_to_hub("me/bottles")
    loaded = AnomalyCLIP.from_pretrained("me/bottles", device="cpu")
    assert loaded.num_references == 2 and loaded.thresholds == Thresholds(image=0.8, pixel=0.7)


# ----------------------------------------------------------------------------- load (item 3)
def _cache_profile(hf_cache, model, tmp_path, repo_id, names, edit=None):
    saved = model.save_pretrained(tmp_path / repo_id.replace("/", "-"))
    if edit is not None:
        config = json.loads((saved / "config.json").read_text())
        edit(config)
        (saved / "config.json").write_text(json.dumps(config))
    _put_in_hf_cache(hf_cache, repo_id, {n: saved / n for n in names})


def test_a_partly_cached_profile_is_an_error_offline(hf_cache, model, tmp_path):
    _profile(model)
    _cache_profile(hf_cache, model, tmp_path, "test-org/partial", ("config.json", "model.safetensors"))
    with pytest.raises(WeightsNotFoundError, match=r"references\.safetensors is not in the local Hugging Face cache.*hf download test-org/partial"):
        AnomalyCLIP.from_pretrained("test-org/partial", device="cpu")
    with pytest.raises(WeightsNotFoundError, match="references.safetensors"):
        AnomalyCLIP.from_pretrained("test-org/partial", device="cpu", local_files_only=True)

    _cache_profile(hf_cache, model, tmp_path, "test-org/whole", ("config.json", "model.safetensors", REFERENCES_NAME))
    loaded = AnomalyCLIP.from_pretrained("test-org/whole", device="cpu")
    assert loaded.num_references == 1 and loaded.thresholds == Thresholds(image=0.7, pixel=2.5)


def test_configs_written_before_the_record_load_as_before(hf_cache, model, tmp_path, caplog):
    _profile(model)

    def old(config):
        del config["references"]

    _cache_profile(hf_cache, model, tmp_path, "test-org/old-partial", ("config.json", "model.safetensors"), edit=old)
    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        loaded = AnomalyCLIP.from_pretrained("test-org/old-partial", device="cpu")
    assert loaded.num_references == 0 and "Loading without them" in caplog.text
    names = ("config.json", "model.safetensors", REFERENCES_NAME)
    _cache_profile(hf_cache, model, tmp_path, "test-org/old-whole", names, edit=old)
    assert AnomalyCLIP.from_pretrained("test-org/old-whole", device="cpu").num_references == 1


def test_a_local_profile_missing_its_references_is_an_error(model, tmp_path, caplog):
    saved = _profile(model).save_pretrained(tmp_path / "profile")
    copy = tmp_path / "copied"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(saved / name, copy / name)
    with pytest.raises(CheckpointError, match=r"has no references\.safetensors, but its config\.json names it"):
        AnomalyCLIP.from_pretrained(copy, device="cpu")

    # A zero-shot config beside a stray references file (e.g. copied in by hand) stays zero-shot.
    model.clear_references()
    model.save_pretrained(copy)
    shutil.copyfile(saved / REFERENCES_NAME, copy / REFERENCES_NAME)
    assert AnomalyCLIP.from_pretrained(copy, device="cpu").num_references == 0


def test_a_repo_whose_config_names_missing_references_is_an_error(model, hub):
    _profile(model).push_to_hub("me/broken")
    files = hub.files("me/broken")
    del files[REFERENCES_NAME]
    hub.repos["me/broken"]["main"].append(files)  # someone deleted the file on the web page
    with pytest.raises(WeightsNotFoundError, match="references.safetensors"):  # tests run with HF_HUB_OFFLINE=1
        AnomalyCLIP.from_pretrained("me/broken", device="cpu")
