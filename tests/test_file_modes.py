"""Every file the library saves gets the umask's mode (``0o666 & ~umask``), as ``open`` gives:
a profile saved under umask 022 is readable by other users, containers and cluster nodes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from anomalyclip.files import atomic_path, atomic_write
from anomalyclip.references import ReferenceMemory

from .conftest import IMAGE_B, OFFICIAL_PTH, TINY_CLIP_REF

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")

UMASKS = [0o022, 0o077, 0o002]


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def profile_model(tiny_clip):
    from anomalyclip import AnomalyCLIP

    model = AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=112)
    model.add_references(IMAGE_B)
    return model


def test_current_umask_reads_without_changing_it(umask):
    from anomalyclip.files import current_umask

    assert current_umask() == umask
    assert current_umask() == umask


def test_save_pretrained_and_references_get_the_umask_mode(profile_model, tmp_path, umask):
    expected = 0o666 & ~umask
    out = profile_model.save_pretrained(tmp_path / "profile")
    modes = _modes(out)
    assert sorted(modes) == ["README.md", "config.json", "model.safetensors", "references.safetensors"]
    assert modes == dict.fromkeys(modes, expected), {k: oct(v) for k, v in modes.items()}
    memory_file = profile_model.references.save(tmp_path / "memory.safetensors")
    assert stat.S_IMODE(memory_file.stat().st_mode) == expected
    assert ReferenceMemory.load(memory_file).num_images == 1


def test_writers_that_replace_their_temporary_file(tmp_path, umask):
    """A writer that replaces the file it is given with its own 0600 temporary file (as
    safetensors does) still leaves a file with the umask's mode."""
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x")
        os.close(fd)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    with atomic_write(tmp_path / "text.txt", "w") as handle:
        handle.write("x")
    assert stat.S_IMODE((tmp_path / "text.txt").stat().st_mode) == 0o666 & ~umask


def test_write_scores(tmp_path, umask):
    from anomalyclip.predict_io import write_scores

    csv_path, json_path = write_scores(tmp_path, [{"image": "a.png", "score": 0.5}])
    for path in (csv_path, json_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_onnx_export_files_get_the_umask_mode(tmp_path, umask):
    """The export's atomic save (a program that writes 0600 files, the model and its external
    weights) leaves both files with the umask's mode."""
    from anomalyclip.onnx.export import _save_atomically

    class Program:
        def save(self, destination, external_data):
            for path in (Path(destination), Path(str(destination) + ".data")) if external_data else (Path(destination),):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                os.write(fd, b"onnx")
                os.close(fd)

    _save_atomically(Program(), tmp_path / "model.onnx", external=True)
    assert _modes(tmp_path) == dict.fromkeys(["model.onnx", "model.onnx.data"], 0o666 & ~umask)
