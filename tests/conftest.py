"""Shared fixtures. Tests never touch the network: Hub access is offline for the whole session."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: every test runs offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ANOMALYCLIP_OFFLINE"] = "1"
# Under pytest-xdist the workers share the cores: each gets its share of threads (torch's OpenMP
# pool, and the subprocesses and Ray workers the tests start, which inherit the variable), so that
# two workers on two cores do not run four spinning threads.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS)))

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

if _XDIST_WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
TINY_CLIP = GOLDEN / "tiny-clip"
TINY_CLIP_REF = f"local-dir:{TINY_CLIP}"
OFFICIAL_PTH = GOLDEN / "official_prompt_learner.pth"
IMAGE_A, IMAGE_B, MASK_A = GOLDEN / "image_a.png", GOLDEN / "image_b.png", GOLDEN / "mask_a.png"


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point every cache at a temporary folder so tests never read or write the user's caches."""
    root = tmp_path_factory.mktemp("caches")
    os.environ["ANOMALYCLIP_CACHE"] = str(root / "anomalyclip")
    os.environ["HF_HUB_CACHE"] = str(root / "hf-empty")
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    constants.HF_HUB_CACHE = str(root / "hf-empty")


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    """The official implementation's outputs on the tiny CLIP (see fixtures/golden/README.md)."""
    return load_file(str(GOLDEN / "expected.safetensors"))


@pytest.fixture(scope="session")
def tiny_clip():
    """The tiny random CLIP of the golden run, built by open_clip from its local-dir layout."""
    from anomalyclip.backbone import load_clip

    return load_clip(TINY_CLIP_REF)


@pytest.fixture(scope="session")
def golden_model(tiny_clip):
    """AnomalyCLIP with the official-format golden prompts on the tiny CLIP (float32, CPU, S=518).

    Shared by many tests: do not modify it in place (use ``fresh_model``).
    """
    from anomalyclip import AnomalyCLIP

    return AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu")


@pytest.fixture
def fresh_model(tiny_clip):
    """A private model with the golden prompts, free to modify."""
    from anomalyclip import AnomalyCLIP

    return AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu")


def _put_in_hf_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> str:
    """Lay out ``files`` as one snapshot of ``repo_id`` in a Hugging Face cache (refs/main -> commit)."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name, src in files.items():
        shutil.copyfile(src, snapshot / name)
    return commit


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, golden_model) -> Path:
    """A real Hugging Face cache, offline, holding two repos:

    - ``test-org/tiny-clip``: the tiny CLIP in open_clip's Hub layout;
    - ``test-org/anomalyclip-tiny``: golden prompts in ``save_pretrained`` format whose config
      names ``hf-hub:test-org/tiny-clip`` as backbone.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    _put_in_hf_cache(
        cache,
        "test-org/tiny-clip",
        {n: TINY_CLIP / n for n in ("open_clip_config.json", "open_clip_model.safetensors")},
    )
    saved = tmp_path / "saved"
    golden_model.save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    config["backbone"] = "hf-hub:test-org/tiny-clip"
    (saved / "config.json").write_text(json.dumps(config))
    _put_in_hf_cache(cache, "test-org/anomalyclip-tiny", {n: saved / n for n in ("config.json", "model.safetensors")})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# The session's ONNX exports (one per configuration, shared by every test module and xdist worker).
from .onnx_fixtures import exported, onnx_folder, onnx_model, saved_profile, torch_reference  # noqa: E402,F401

# One local Ray for the tests that need one (the ``ray_runtime`` fixture; see tests/ray_session.py).
pytest_plugins = ["tests.ray_session"]
