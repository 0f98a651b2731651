"""Official-checkpoint conversion, the presets' fetch/verify/cache path, and backbone checks."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from anomalyclip import AnomalyCLIP, BackboneError, CheckpointError, WeightsNotFoundError
from anomalyclip.backbone import check_clip, load_clip
from anomalyclip.presets import OfficialPreset, fetch_official_checkpoint, git_blob_sha1

from .conftest import IMAGE_A, OFFICIAL_PTH, TINY_CLIP, TINY_CLIP_REF



def _state() -> dict[str, torch.Tensor]:
    return dict(torch.load(OFFICIAL_PTH, weights_only=True)["prompt_learner"])


def _write(tmp_path: Path, state: dict, name: str = "ckpt.pth", wrap: bool = True) -> Path:
    path = tmp_path / name
    torch.save({"prompt_learner": state} if wrap else state, path)
    return path


def _convert(path: Path, tiny_clip) -> AnomalyCLIP:
    return AnomalyCLIP.from_official_checkpoint(path, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu")


def test_git_blob_id_is_gits(tmp_path):
    # `printf 'hello\n' | git hash-object --stdin` prints this id.
    f = tmp_path / "hello.txt"
    f.write_bytes(b"hello\n")
    assert git_blob_sha1(f) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_bare_state_dict_is_accepted(tmp_path, tiny_clip, golden_model):
    model = _convert(_write(tmp_path, _state(), wrap=False), tiny_clip)
    assert torch.equal(model.prompts.deep_prompts, golden_model.prompts.deep_prompts)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("ctx_neg"), r"missing keys \['ctx_neg'\]"),
        (lambda s: s.update(bogus=torch.zeros(1)), r"unexpected keys \['bogus'\]"),
        (lambda s: s.update(ctx_pos=torch.zeros(1, 1, 12, 65)), r"ctx_pos has shape \[1, 1, 12, 65\], expected \[1, 1, n_ctx, 64\]"),
        (lambda s: s.update(ctx_neg=torch.zeros(1, 1, 10, 64)), "ctx_neg has shape"),
        (lambda s: s.update({"compound_prompts_text.3": torch.zeros(5, 64)}), r"compound_prompts_text.3 has shape \[5, 64\]"),
        (lambda s: s.pop("compound_prompts_text.2"), r"deep prompt indices \[0, 1, 3"),
        (lambda s: s["tokenized_prompts_neg"].__setitem__((0, 0, 13), 1234), "tokenized_prompts_neg holds token ids"),
        (lambda s: s["token_suffix_pos"].add_(0.5), "'token_suffix_pos' does not match the token embeddings"),
        (lambda s: s["token_prefix_neg"].mul_(-1), "'token_prefix_neg' does not match"),
        (lambda s: s["ctx_pos"].fill_(float("nan")), "ctx_normal contains NaN"),
    ],
)
def test_bad_checkpoints_are_rejected(tmp_path, tiny_clip, mutate, message):
    state = _state()
    mutate(state)
    with pytest.raises(CheckpointError, match=message):
        _convert(_write(tmp_path, state), tiny_clip)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the hand-made unsafe pickle
def test_unreadable_and_unsafe_files(tmp_path, tiny_clip):
    with pytest.raises(CheckpointError, match="not found"):
        _convert(tmp_path / "missing.pth", tiny_clip)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read .*garbage.pth': it is not a readable PyTorch checkpoint"):
        _convert(garbage, tiny_clip)
    # A pickle that would run code on load is refused by weights_only=True, and said so.
    unsafe = tmp_path / "unsafe.pth"
    with open(unsafe, "wb") as f:
        pickle.dump({"prompt_learner": {"ctx_pos": shutil.rmtree}}, f)
    with pytest.raises(CheckpointError, match=r"Refused to load .* for safety: it would import .*shutil\.rmtree"):
        _convert(unsafe, tiny_clip)
    torch.save({"something": 1}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="prompt state dict"):
        _convert(tmp_path / "other.pth", tiny_clip)


class _NotATensor:  # a class torch.save pickles by reference: weights_only loading refuses it
    pass


@pytest.mark.parametrize("cut", [0, 100, 0.5, -10])
def test_a_truncated_checkpoint_is_corrupt_not_unsafe(tmp_path, tiny_clip, cut):
    """A cut-off download says 'corrupt or truncated', never 'refused for safety'."""
    data = OFFICIAL_PTH.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else cut
    truncated = tmp_path / "epoch_15.pth"
    truncated.write_bytes(data[:end])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint; it is corrupt or truncated") as info:
        _convert(truncated, tiny_clip)
    assert "safety" not in str(info.value)


def test_a_checkpoint_with_foreign_objects_is_refused_for_safety(tmp_path, tiny_clip):
    torch.save({"prompt_learner": {"ctx_pos": _NotATensor()}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=r"for safety: it would import .*_NotATensor") as info:
        _convert(tmp_path / "foreign.pth", tiny_clip)
    assert "corrupt" not in str(info.value)


# ----------------------------------------------------------------------------- presets
@pytest.fixture
def local_preset(tmp_path) -> OfficialPreset:
    """A preset whose 'download' is the golden official checkpoint, served from a file:// URL."""
    served = tmp_path / "served" / "epoch_15.pth"
    served.parent.mkdir()
    shutil.copyfile(OFFICIAL_PTH, served)
    return OfficialPreset(
        name="tiny-test",
        url=served.as_uri(),
        git_blob_sha1=git_blob_sha1(OFFICIAL_PTH),
        backbone=TINY_CLIP_REF,
        trained_on="nothing (random)",
        recommended_for="tests",
    )


@pytest.fixture
def online(monkeypatch):
    """Allow the (file://) download for one test; the session is offline otherwise."""
    from huggingface_hub import constants

    monkeypatch.delenv("ANOMALYCLIP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_fetch_verifies_and_caches(local_preset, online, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = fetch_official_checkpoint(local_preset, cache_dir=cache)
    assert path.read_bytes() == OFFICIAL_PTH.read_bytes()
    assert path.is_relative_to(cache)

    # Second call: served from the cache, no download.
    monkeypatch.setattr("anomalyclip.presets._download", lambda *a, **k: pytest.fail("downloaded again"))
    assert fetch_official_checkpoint(local_preset, cache_dir=cache) == path


def test_fetch_rejects_a_wrong_file(local_preset, online, tmp_path):
    wrong = OfficialPreset(**{**local_preset.__dict__, "git_blob_sha1": "0" * 40})
    with pytest.raises(CheckpointError, match="not the published checkpoint"):
        fetch_official_checkpoint(wrong, cache_dir=tmp_path / "cache")
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []  # nothing unverified is kept


def test_offline_fetch_says_how_to_use_a_local_file(local_preset, tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        fetch_official_checkpoint(local_preset, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "anomalyclip fetch tiny-test --file" in message and "from_official_checkpoint" in message


def test_install_from_local_file_then_load_preset(local_preset, tmp_path, golden):
    """Offline path: a local copy stands in for the download; conversion and caching follow."""
    cache = tmp_path / "cache"
    fetch_official_checkpoint(local_preset, source=OFFICIAL_PTH, cache_dir=cache)
    model = AnomalyCLIP.from_pretrained(local_preset, cache_dir=cache, device="cpu")
    converted = cache / "anomalyclip" / "converted" / "tiny-test"
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()
    result = model.predict(IMAGE_A)
    assert abs(result.score - float(golden["a.top.score"])) < 1e-4
    # Later loads use the converted copy, with overrides applied.
    again = AnomalyCLIP.from_pretrained(local_preset, cache_dir=cache, device="cpu", feature_layers=(6, 12, 18, 24))
    assert again.config.feature_layers == (6, 12, 18, 24)
    assert abs(again.predict(IMAGE_A).score - float(golden["a.multi.score"])) < 1e-4


def test_unknown_preset_lists_the_available_ones():
    from anomalyclip import InvalidInputError

    with pytest.raises(InvalidInputError, match="official-mvtec, official-visa"):
        fetch_official_checkpoint("nope")


def test_default_from_pretrained_offline_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="official-visa"):
        AnomalyCLIP.from_pretrained(cache_dir=tmp_path)


# ----------------------------------------------------------------------------- backbones
def test_backbone_reference_errors(tmp_path):
    with pytest.raises(BackboneError, match="Unknown backbone reference 'ViT-L-14'"):
        load_clip("ViT-L-14")
    with pytest.raises(BackboneError, match="not found"):
        load_clip(f"local-dir:{tmp_path / 'missing'}")
    with pytest.raises(BackboneError, match="no open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path}")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copyfile(TINY_CLIP / "open_clip_config.json", only_config / "open_clip_config.json")
    with pytest.raises(WeightsNotFoundError, match="no weights"):
        load_clip(f"local-dir:{only_config}")
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE"):
        load_clip("hf-hub:someone/uncached-clip")


def test_non_vit_backbone_is_rejected():
    import open_clip

    resnet = open_clip.create_model("RN50", pretrained=None)
    with pytest.raises(BackboneError, match="not a VisionTransformer"):
        check_clip(resnet, "RN50")
