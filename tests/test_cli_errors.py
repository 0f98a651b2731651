"""Each interface's errors name its own fix: the command line its flags, Python its keywords;
and the command prints an error once."""

from __future__ import annotations

import logging

import pytest

from anomalyclip import AnomalyCLIP, DatasetError, InvalidInputError, load_dataset
from anomalyclip.cli import main
from anomalyclip.data.synthetic import make_synthetic_dataset

from .conftest import IMAGE_A, IMAGE_B, OFFICIAL_PTH, TINY_CLIP_REF

SIZE = 112


def test_with_fix_spells_the_fix_per_interface():
    from anomalyclip.errors import AnomalyCLIPError, with_fix

    error = with_fix(DatasetError, "Bad {fix}.", python="pass x=1", cli="pass --x 1")
    assert isinstance(error, DatasetError) and isinstance(error, ValueError)
    assert str(error) == "Bad pass x=1." and error.message_for("python") == "Bad pass x=1."
    assert error.message_for("cli") == "Bad pass --x 1."
    assert AnomalyCLIPError("plain").message_for("cli") == "plain"


@pytest.fixture
def unmasked_data(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", layout="mvtec", n_normal=2, n_anomalous=2, size=(64, 64))
    missing = sorted(root.rglob("*_mask.png"))[0]
    missing.unlink()
    return root


def test_a_missing_mask_names_no_masks_on_the_cli(unmasked_data, tmp_path, capsys):
    code = main(["-q", "evaluate", "--data", str(unmasked_data), "--format", "mvtec", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "pass --no-masks" in err and "require_masks" not in err
    assert err.count("error:") == 1
    with pytest.raises(DatasetError, match="pass require_masks=False") as info:
        load_dataset(unmasked_data, "mvtec")
    assert "--no-masks" not in str(info.value)


def test_finetune_into_a_used_folder_names_resume_on_the_cli(tmp_path, capsys):
    from anomalyclip.train.finetune import finetune

    data = make_synthetic_dataset(tmp_path / "aux", layout="folder", n_normal=2, n_anomalous=2, size=(64, 64))
    out = tmp_path / "run"
    (out / "epoch_1").mkdir(parents=True)
    args = ["-q", "finetune", "--data", str(data), "--format", "folder", "--out", str(out)]
    code = main([*args, "--clip", TINY_CLIP_REF, "--image-size", str(SIZE), "--epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"pass --resume {out}" in err and "resume_from" not in err
    model = AnomalyCLIP.from_backbone(TINY_CLIP_REF, device="cpu", image_size=SIZE)
    with pytest.raises(InvalidInputError, match=r"pass resume_from='.*run' to continue it") as info:
        finetune(model, load_dataset(data, "folder"), epochs=1, output_dir=out, progress=False)
    assert "--resume" not in str(info.value)


def test_predict_at_another_size_than_a_profiles_references(tiny_clip, tmp_path, capsys, caplog):
    model = AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=SIZE)
    model.add_references(IMAGE_B)
    profile = model.save_pretrained(tmp_path / "profile")
    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        code = main(["-q", "predict", str(IMAGE_A), "--model", str(profile), "--image-size", "224", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "image_size 112 (the model now has 224)" in err and "Drop --image-size" in err
    assert "clear_references" not in err and "reconfigure" not in err
    assert err.count("do not match") == 1 and "do not match" not in caplog.text  # said once, not warned first
    assert not (tmp_path / "o").exists()

    with caplog.at_level(logging.WARNING, logger="anomalyclip"):
        loaded = AnomalyCLIP.from_pretrained(profile, device="cpu", image_size=224)  # Python: warned at load
    assert "clear_references" in caplog.text
    with pytest.raises(InvalidInputError, match=r"Call model\.clear_references\(\)") as info:
        loaded.predict(IMAGE_A)
    assert "--image-size" not in str(info.value)
