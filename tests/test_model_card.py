"""Model cards (save_pretrained / push_to_hub) and the Hub options of from_pretrained, offline."""

from __future__ import annotations

import json
import warnings

import pytest
from huggingface_hub import ModelCard

from anomalyclip import AnomalyCLIP, InvalidInputError, Thresholds, WeightsNotFoundError
from anomalyclip.card import CARD_MARKER, base_model_id, is_generated_card

from .conftest import IMAGE_A, OFFICIAL_PTH, TINY_CLIP_REF
from .fakehub import FakeHub

USER_README = "---\nlicense: apache-2.0\n---\n# My bottle inspector\n\nHand-written notes.\n"
OLD_PLACEHOLDER_CARD = (  # what anomalyclip 0.1's push_to_hub wrote
    "---\nlibrary_name: anomalyclip\ntags:\n- anomaly-detection\n---\n\n# AnomalyCLIP prompts\n\n"
    'model = AnomalyCLIP.from_pretrained("<this repo>")\n'
)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """``hub(remote_readme=None)``: a fake Hub (tests/fakehub.py), optionally with a repo
    ``me/prompts`` that already holds ``remote_readme``."""

    def install(remote_readme: str | None = None) -> FakeHub:
        fake = FakeHub(tmp_path / "hub").install(monkeypatch)
        if remote_readme is not None:
            fake.put("me/prompts", {"README.md": remote_readme.encode()})
        return fake

    return install


def _hub_backbone_model(fresh_model) -> AnomalyCLIP:
    fresh_model.config = fresh_model.config.replace(backbone="hf-hub:test-org/tiny-clip", trained_on="VisA")
    return fresh_model


def test_push_to_hub_uploads_the_saved_format_with_a_real_card(fresh_model, hub):
    fake = hub()
    model = _hub_backbone_model(fresh_model)
    model.thresholds = Thresholds(image=0.42, pixel=0.61)
    url = model.push_to_hub("me/prompts", private=True, token="t")
    assert url == "https://huggingface.co/me/prompts/commit/1"
    assert fake.tokens == ["t"] and fake.private["me/prompts"] is True
    files = fake.files("me/prompts")
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(files["config.json"])["thresholds"] == {"image": 0.42, "pixel": 0.61}

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "anomalyclip"
    assert card.data.license == "mit"
    assert card.data.base_model == "test-org/tiny-clip"
    assert "<this repo>" not in card.text
    assert 'AnomalyCLIP.from_pretrained("me/prompts")' in card.text
    assert "trained on **VisA**" in card.text and "CC BY 4.0" in card.text
    assert "| image | 0.42 |" in card.text and "| pixel | 0.61 |" in card.text
    assert "Map values lie in [0, 1]" in card.text
    assert card.text.lstrip().startswith(CARD_MARKER)


def test_push_to_hub_keeps_a_readme_the_user_wrote(golden_model, hub):
    fake = hub(remote_readme=USER_README)
    golden_model.push_to_hub("me/prompts")
    files = fake.files("me/prompts")
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    assert files["README.md"].decode() == USER_README  # their README stays


def test_push_to_hub_replaces_its_own_old_placeholder_card(golden_model, hub):
    fake = hub(remote_readme=OLD_PLACEHOLDER_CARD)
    golden_model.push_to_hub("me/prompts")
    assert 'from_pretrained("me/prompts")' in fake.files("me/prompts")["README.md"].decode()


def test_push_to_hub_refuses_a_bad_repo_id(golden_model, hub):
    hub()
    with pytest.raises(InvalidInputError, match=r"repo_id must be 'org/name'.*got 'prompts'"):
        golden_model.push_to_hub("prompts")


def test_save_pretrained_writes_a_card_and_keeps_a_user_readme(fresh_model, tmp_path):
    out = fresh_model.save_pretrained(tmp_path / "m")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "anomalyclip" and card.data.license == "mit"
    assert card.data.base_model is None  # a local-dir backbone has no Hub id
    assert f'AnomalyCLIP.from_pretrained("{tmp_path / "m"}")' in card.text
    assert "None saved" in card.text and "not recorded" in card.text

    # Our own card is regenerated when the model changes ...
    fresh_model.thresholds = Thresholds(image=0.3)
    fresh_model.save_pretrained(out)
    assert "| image | 0.3 |" in (out / "README.md").read_text()
    # ... a README the user wrote is never overwritten.
    (out / "README.md").write_text(USER_README)
    fresh_model.save_pretrained(out)
    assert (out / "README.md").read_text() == USER_README
    # model_card=False writes none.
    assert not (fresh_model.save_pretrained(tmp_path / "bare", model_card=False) / "README.md").exists()


def test_card_helpers():
    assert base_model_id("hf-hub:timm/vit_large_patch14_clip_336.openai") == "timm/vit_large_patch14_clip_336.openai"
    assert base_model_id("local-dir:/models/clip") is None
    assert is_generated_card(OLD_PLACEHOLDER_CARD)
    assert not is_generated_card(USER_README)


def test_official_checkpoint_of_a_preset_records_what_it_was_trained_on(tiny_clip, monkeypatch):
    from anomalyclip.presets import OfficialPreset, git_blob_sha1

    preset = OfficialPreset(
        name="tiny-test",
        url="file:///nowhere",
        git_blob_sha1=git_blob_sha1(OFFICIAL_PTH),
        backbone=TINY_CLIP_REF,
        trained_on="MVTec AD",
        recommended_for="tests",
    )
    plain = AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu")
    assert plain.config.trained_on is None  # not a published checkpoint
    monkeypatch.setattr("anomalyclip.model.factory.PRESETS", {preset.name: preset})
    model = AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu")
    assert model.config.trained_on == "MVTec AD"


def test_finetune_records_the_data_set_and_drops_thresholds(tiny_clip, tmp_path):
    from anomalyclip.data.datasets import load_dataset
    from anomalyclip.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(
        tmp_path / "bottles", layout="mvtec", n_normal=2, n_anomalous=2, size=(32, 32), seed=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_dataset(root, "mvtec")
    model = AnomalyCLIP.from_clip(tiny_clip, backbone=TINY_CLIP_REF, image_size=56, seed=0)
    model.thresholds = Thresholds(image=0.5)
    with pytest.raises(InvalidInputError):
        model.finetune(data, epochs=1, batch_size=0, progress=False)  # refused before training: the model is as it was
    assert model.thresholds == Thresholds(image=0.5) and model.config.trained_on is None
    model.finetune(data, epochs=1, batch_size=4, output_dir=tmp_path / "out", progress=False)
    assert model.config.trained_on == "MVTec AD" and model.thresholds is None
    assert json.loads((tmp_path / "out" / "config.json").read_text())["trained_on"] == "MVTec AD"
    assert "trained on **MVTec AD**" in (tmp_path / "out" / "README.md").read_text()


# ----------------------------------------------------------------------------- Hub options on load
def test_from_pretrained_passes_hub_options(hf_cache, golden_model, monkeypatch):
    import huggingface_hub

    seen = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("token", "local_files_only", "force_download")})
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    model = AnomalyCLIP.from_pretrained("test-org/anomalyclip-tiny", device="cpu", token="secret", local_files_only=True)
    assert seen[:1] == [{"token": "secret", "local_files_only": True, "force_download": False}]
    assert model.predict(IMAGE_A).score == pytest.approx(golden_model.predict(IMAGE_A).score, abs=1e-6)
    with pytest.raises(WeightsNotFoundError, match="local_files_only=True and the files are not in the local"):
        AnomalyCLIP.from_pretrained("test-org/not-cached", device="cpu", local_files_only=True)
    with pytest.raises(InvalidInputError, match="local_files_only and force_download must be True or False"):
        AnomalyCLIP.from_pretrained("test-org/anomalyclip-tiny", local_files_only="yes")


def test_preset_with_local_files_only_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr("anomalyclip.presets._download", lambda *a, **k: pytest.fail("downloaded"))
    monkeypatch.delenv("ANOMALYCLIP_OFFLINE", raising=False)
    with pytest.raises(WeightsNotFoundError, match=r"downloads are disabled \(local_files_only=True\)"):
        AnomalyCLIP.from_pretrained("official-visa", cache_dir=tmp_path, local_files_only=True)
