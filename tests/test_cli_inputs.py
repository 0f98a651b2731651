"""The CLI's image-file options, Ray's work split, and small CLI fixes: offline ``convert`` fails
fast, unreadable checkpoints without torch's ``weights_only=False`` advice, ``finetune`` refuses
another run's folder before loading a backbone."""

from __future__ import annotations

import csv
import pickle
import socket
import time

import pytest

from anomalyclip.cli import build_parser, main
from anomalyclip.errors import WeightsNotFoundError

from .conftest import OFFICIAL_PTH, TINY_CLIP_REF
from .fixtures_images import SIZE, TWINS, UNREADABLE, make_input_folder

S = 224


@pytest.fixture(scope="module")
def saved(tmp_path_factory, golden_model):
    return golden_model.save_pretrained(tmp_path_factory.mktemp("cli-inputs") / "model")


def test_read_option_flags_build_the_options():
    from anomalyclip import ImageReadOptions
    from anomalyclip.decoding import DEFAULT_MAX_IMAGE_PIXELS
    from anomalyclip.predict_io import read_options

    parser = build_parser()
    plain = read_options(parser.parse_args(["predict", "x.png"]))
    assert plain == ImageReadOptions() and plain.pixel_limit() == DEFAULT_MAX_IMAGE_PIXELS
    args = parser.parse_args(["predict", "x.png", "--bit-depth", "12", "--no-exif-transpose", "--max-image-pixels", "0"])
    assert read_options(args) == ImageReadOptions(exif_transpose=False, bit_depth=12, max_image_pixels=0)
    args = parser.parse_args(["predict", "x.png", "--intensity-range", "100", "4000", "--max-image-pixels", "300000000"])
    assert read_options(args) == ImageReadOptions(intensity_range=(100.0, 4000.0), max_image_pixels=300_000_000)


def test_cli_predict_scores_each_file_as_its_twin(saved, tmp_path, capsys):
    pytest.importorskip("tifffile")
    files = make_input_folder(tmp_path / "images")
    good = [str(p) for name, p in files.items() if name not in UNREADABLE]
    out = tmp_path / "out"
    assert main(["-q", "predict", *good, "--model", str(saved), "--out", str(out), "--image-size", str(S)]) == 0
    with open(out / "scores.csv", newline="") as handle:
        rows = {r["image"].rsplit("/", 1)[-1]: r for r in csv.DictReader(handle)}
    for name, (twin, bound) in TWINS.items():
        assert abs(float(rows[name]["score"]) - float(rows[twin]["score"])) <= (1e-3 if bound == "1e-3" else 2e-6), name
    from PIL import Image

    for name in ("gray16.png", "rgb16.tif", "rotated.jpg"):  # overlays at the picture's (oriented) size
        assert Image.open(out / rows[name]["overlay"]).size == SIZE
    # A file over the pixel limit is an error row (exit status 1), or stops the run with --strict (2).
    assert main(["-q", "predict", good[0], "--model", str(saved), "--max-image-pixels", "100", "--out", str(out)]) == 1
    with open(out / "scores.csv", newline="") as handle:
        assert "max_image_pixels" in next(csv.DictReader(handle))["error"]
    args = ["-q", "predict", good[0], "--model", str(saved), "--max-image-pixels", "100", "--out", str(out), "--strict"]
    assert main(args) == 2
    assert "max_image_pixels" in capsys.readouterr().err


def test_ray_work_split_uses_every_worker():
    from anomalyclip.distributed.ray_predict import split_work

    assert split_work(6, 8, 2) == (3, 2)  # one batch of 8 would keep one worker idle
    assert split_work(100, 8, 2) == (8, 2)
    assert split_work(3, 8, 5) == (1, 3)  # no more workers than images
    assert split_work(7, 4, 3) == (3, 3)


# ----------------------------------------------------------------------------- small things
def test_offline_hub_download_fails_fast_without_network(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from anomalyclip.hub import hub_download

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        if kwargs["local_files_only"]:
            raise LocalEntryNotFoundError("not cached")
        time.sleep(5)  # what the real retries would cost (about 29 s)
        raise AssertionError("went to the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    started = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="cannot be reached .*does not resolve"):
        hub_download("timm/some-clip", "open_clip_config.json", cache_dir=tmp_path)
    assert time.perf_counter() - started < 2 and calls[0]["local_files_only"] is True
    # behind a proxy nothing is concluded from DNS: the download is tried
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: calls.append(kw) or str(tmp_path / "f"))
    hub_download("timm/some-clip", "open_clip_config.json", cache_dir=tmp_path)
    assert calls[-1]["local_files_only"] is False


def test_convert_of_a_non_checkpoint_gives_no_weights_only_false_advice(tmp_path, capsys):
    bad = tmp_path / "list.pth"
    bad.write_bytes(pickle.dumps([1, 2, 3], protocol=4))  # a pickle torch's safe loader refuses
    assert main(["-q", "convert", str(bad), str(tmp_path / "out"), "--clip", TINY_CLIP_REF]) == 2
    err = capsys.readouterr().err
    assert "not a readable PyTorch checkpoint" in err and "Unsupported operand" in err
    assert "weights_only" not in err and "Detected pickle protocol" not in err


def test_finetune_refuses_another_runs_folder_before_loading_a_backbone(tmp_path, monkeypatch, capsys):
    from anomalyclip import AnomalyCLIP

    out = tmp_path / "run"
    (out / "epoch_1").mkdir(parents=True)

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a backbone before checking the output folder")

    monkeypatch.setattr(AnomalyCLIP, "from_backbone", no_loading)
    monkeypatch.setattr(AnomalyCLIP, "from_pretrained", no_loading)
    code = main(["-q", "finetune", "--data", str(tmp_path / "nowhere"), "--format", "mvtec", "--out", str(out), "--clip", TINY_CLIP_REF])
    assert code == 2 and "already holds checkpoints" in capsys.readouterr().err


def test_convert_offline_names_the_cause_quickly(tmp_path, capsys):
    """HF_HUB_OFFLINE=1 (set for the whole suite) and the default backbone not cached: one line, no retries."""
    started = time.perf_counter()
    assert main(["-q", "convert", str(OFFICIAL_PTH), str(tmp_path / "out")]) == 2
    assert time.perf_counter() - started < 20
    assert "HF_HUB_OFFLINE=1 is set" in capsys.readouterr().err
