"""Scale-out with Ray Data (anomalyclip.distributed, ``predict --ray``).

The predictor class, the map encodings and the sources are tested in this process first (fast,
no Ray cluster). Then the session's local Ray (``num_cpus=2``, tests/ray_session.py) runs the
tests that need it: parity with the single-process path (scores <= 1e-5), each image exactly once
in input order with error rows, through an actor killed mid-run; Ray datasets as input; and the
CLI. Each Ray run starts its own actors (a new process that imports torch and open_clip: seconds
of CPU each), so the tests keep them few: every property that one run can show is checked on
that run. CI installs the ``[ray]`` extra, so these run there; without Ray installed they are
skipped.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyclip import AnomalyCLIP
from anomalyclip.errors import ImageLoadError, InvalidInputError

from .conftest import IMAGE_A, IMAGE_B
from .ray_session import RAY_GROUP

S = 112  # a small processing size keeps the tiny CLIP fast; parity is checked at the same size
TOL = 1e-5
THRESHOLDS = {"image": 0.3, "pixel": 0.5}  # at S = 112 the good images score 0.21-0.23 or 0.41


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, golden_model) -> Path:
    """The golden prompts on the tiny CLIP, saved as a folder (what actors load)."""
    return golden_model.save_pretrained(tmp_path_factory.mktemp("ray-model") / "model")


@pytest.fixture(scope="module")
def local_model(saved_model) -> AnomalyCLIP:
    """The single-process reference: the same folder loaded here, at the same options."""
    return AnomalyCLIP.from_pretrained(saved_model, device="cpu", image_size=S)


def _write_images(folder: Path) -> None:
    """Images of mixed sizes and modes (RGB, L, P, RGBA, JPEG) in nested folders."""
    a, b = Image.open(IMAGE_A), Image.open(IMAGE_B)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    a.save(folder / "a.png")
    b.save(folder / "b_gray.png")
    a.resize((160, 90)).save(folder / "small.png")
    a.convert("P").save(folder / "palette.png")
    a.convert("RGBA").rotate(30).save(folder / "sub" / "rgba.png")
    a.crop((50, 20, 350, 280)).save(folder / "sub" / "crop.jpg", quality=90)
    b.resize((300, 200)).save(folder / "sub" / "a.png")  # same stem as ../a.png


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray-images") / "images"
    _write_images(folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable
    Image.new("RGB", (10, 12)).save(folder / "tiny.png")  # smaller than one 14 px patch
    return folder


@pytest.fixture(scope="module")
def listed(image_dir) -> list[str]:
    from anomalyclip.predict_io import collect_images

    return [str(p) for p in collect_images([image_dir])]


BAD = {"broken.png": "Cannot read image", "tiny.png": "smaller than one 14x14 patch"}


@pytest.fixture(scope="module")
def reference(local_model, listed) -> dict[str, object]:
    """Single-process results by path (the good images only)."""
    good = [p for p in listed if Path(p).name not in BAD]
    results = local_model.predict(good, batch_size=4, thresholds=THRESHOLDS)
    # Labels are compared across runs whose scores may differ by TOL: every score is far from the
    # threshold (the same images, _write_images, are the CLI test's), and both labels occur.
    assert min(abs(r.score - THRESHOLDS["image"]) for r in results) > 1e-2
    assert {r.label for r in results} == {0, 1}
    return dict(zip(good, results))


def _batch(paths, **columns):
    batch = {"path": np.array(paths, dtype=object)}
    batch.update({k: np.array(v, dtype=object) if k != "index" else np.asarray(v) for k, v in columns.items()})
    return batch


# ----------------------------------------------------------------------------- no cluster
def test_maps_round_trip_within_the_documented_error(reference):
    from anomalyclip.distributed.maps import PNG_LEVELS, decode_map, encode_map

    amap = next(iter(reference.values())).anomaly_map
    png = encode_map(amap, "png", scale=1.0)
    assert abs(decode_map(png) - amap).max() <= 1.0 / (2 * PNG_LEVELS) + 1e-7
    assert len(png) < amap.nbytes / 2  # compact
    np.testing.assert_array_equal(decode_map(encode_map(amap, "npy")), amap)
    # The scale travels with the PNG: values in [0, 4] for a four-layer model.
    np.testing.assert_allclose(decode_map(encode_map(amap * 4, "png", scale=4.0)), amap * 4, atol=4 / PNG_LEVELS)
    with pytest.raises(ImageLoadError, match="not an anomalyclip map"):
        decode_map(IMAGE_A.read_bytes())
    with pytest.raises(InvalidInputError, match="map format"):
        encode_map(amap, "jpeg")


def test_list_images_matches_the_cli_and_reads_uris(image_dir, listed, tmp_path):
    from anomalyclip.distributed.sources import FileAccess, list_images

    assert list_images(str(image_dir)) == listed
    # file:// URIs go through pyarrow.fs, the path object stores take (s3://, gs://, ...).
    uris = list_images(f"file://{image_dir}/")
    assert uris == [f"file://{p}" for p in sorted(listed)]
    files = FileAccess()
    assert files.read(uris[0]) == Path(sorted(listed)[0]).read_bytes()
    files.write(f"file://{tmp_path}/deep/x.bin", b"abc")
    assert (tmp_path / "deep" / "x.bin").read_bytes() == b"abc"
    with pytest.raises(InvalidInputError, match="No such file"):
        list_images([str(image_dir), str(tmp_path / "missing")])
    with pytest.raises(InvalidInputError, match="No images found"):
        list_images(f"file://{tmp_path}/deep")


def test_predictor_scores_like_predict_with_error_rows(saved_model, listed, reference, tmp_path):
    """The callable class in this process: paths, bytes and arrays give the single-process numbers."""
    from anomalyclip.distributed import AnomalyCLIPPredictor, decode_map

    predictor = AnomalyCLIPPredictor(
        saved_model, device="cpu", image_size=S, batch_size=3, image_threshold=THRESHOLDS["image"],
        pixel_threshold=THRESHOLDS["pixel"],
        maps="npy", map_dir=f"file://{tmp_path}/maps", overlay_dir=tmp_path / "overlays", io_threads=2,
    )
    table = predictor(_batch(listed, index=np.arange(len(listed))))
    assert table.column_names == ["index", "path", "score", "label", "anomalous_fraction", "error", "map_path", "overlay"]
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == listed and [r["index"] for r in rows] == list(range(len(listed)))
    for r in rows:
        name = Path(r["path"]).name
        if name in BAD:
            assert BAD[name] in r["error"] and r["score"] is None and r["map_path"] is None
            continue
        ref = reference[r["path"]]
        assert r["error"] is None and abs(r["score"] - ref.score) <= TOL and r["label"] == ref.label
        assert r["map_path"] == f"file://{tmp_path}/maps/{r['index']:08d}_{Path(r['path']).stem}.npy"
        np.testing.assert_allclose(decode_map(r["map_path"]), ref.anomaly_map, atol=TOL)
        assert (tmp_path / "overlays" / r["overlay"]).is_file()

    # Encoded bytes (read_binary_files) and decoded arrays (read_images) as inputs; inline PNG maps.
    inline = AnomalyCLIPPredictor(saved_model, device="cpu", image_size=S, io_threads=0)
    rgb = [p for p in reference if Image.open(p).mode == "RGB"]
    by_bytes = inline(_batch(rgb, bytes=[Path(p).read_bytes() for p in rgb])).to_pylist()
    arrays = np.empty(len(rgb), dtype=object)
    arrays[:] = [np.asarray(Image.open(p)) for p in rgb]
    by_array = inline({"path": np.array(rgb, dtype=object), "image": arrays}).to_pylist()
    for r_bytes, r_array, path in zip(by_bytes, by_array, rgb):
        assert r_bytes["index"] is None and r_bytes["label"] is None  # no index given, no threshold
        assert abs(r_bytes["score"] - reference[path].score) <= TOL
        assert abs(r_array["score"] - reference[path].score) <= TOL
        assert abs(decode_map(r_bytes["map_png"]) - reference[path].anomaly_map).max() <= 1 / 65535
    with pytest.raises(InvalidInputError, match="'path' column"):
        inline({"image": arrays})


def test_predictor_with_references_and_tiles_matches_the_model(saved_model):
    """Few-shot references and tiling reach each actor's model (checked here, in one process)."""
    from anomalyclip.distributed import AnomalyCLIPPredictor

    options = dict(tile_size=300, tile_overlap=0.25)
    predictor = AnomalyCLIPPredictor(saved_model, device="cpu", image_size=S, references=[str(IMAGE_B)], maps=None, **options)
    row = predictor(_batch([str(IMAGE_A)])).to_pylist()[0]
    model = AnomalyCLIP.from_pretrained(saved_model, device="cpu", image_size=S)
    model.add_references([str(IMAGE_B)], **options)
    assert row["error"] is None and abs(row["score"] - model.predict(str(IMAGE_A), **options).score) <= TOL


def test_predict_dataset_validates_before_starting_ray(saved_model, image_dir, monkeypatch):
    pytest.importorskip("ray")
    import ray

    from anomalyclip.distributed import predict_dataset

    running = ray.is_initialized()  # False, unless a test before this one left Ray running

    def no_start(*args, **kwargs):
        raise AssertionError("predict_dataset started Ray before checking its arguments")

    monkeypatch.setattr(ray, "init", no_start)

    for kwargs, message in [
        (dict(batch_size=0), "batch_size"),
        (dict(concurrency=0), "concurrency"),
        (dict(maps="jpeg"), "maps"),
        (dict(num_gpus=-1), "num_gpus"),
        (dict(image_threshold="high"), "image_threshold"),
        (dict(not_an_option=1), "from_pretrained"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            predict_dataset(str(image_dir), saved_model, **kwargs)
    with pytest.raises(InvalidInputError, match="save_pretrained"):
        predict_dataset(str(image_dir), image_dir)  # a folder without config.json
    with pytest.raises(InvalidInputError, match="No such file"):
        predict_dataset(str(image_dir / "missing"), saved_model)
    assert ray.is_initialized() == running


def test_import_needs_neither_ray_nor_torch():
    """``import anomalyclip.distributed`` is cheap; the map codecs work with Ray and torch blocked."""
    import subprocess

    code = (
        "import sys; sys.modules['ray'] = sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from anomalyclip.distributed import decode_map, encode_map\n"
        "print(decode_map(encode_map(np.full((3, 5), 0.25, np.float32))).shape)"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 5)"


def test_missing_ray_names_the_extra(monkeypatch):
    from anomalyclip.distributed import predict_dataset
    from anomalyclip.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "anomalyclip\[ray\]"') as info:
        predict_dataset("images/")
    assert isinstance(info.value, ImportError)


def test_ray_flags_need_ray(tmp_path, capsys):
    from anomalyclip.cli import main

    assert main(["-q", "predict", str(IMAGE_A), "--workers", "2", "--out", str(tmp_path)]) == 2
    assert "--ray" in capsys.readouterr().err


# ----------------------------------------------------------------------------- local cluster
# The tests that need a running Ray come last in this module, and the Ray Serve test
# (test_distributed_serve.py) right after them: the session's Ray starts once for them all in a
# plain run, and at most once per pytest-xdist worker (tests/ray_session.py).
def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _map_worker_pids() -> set[int]:
    """Processes of our Ray Data actors, by their Ray process title: children of the raylet this
    process started (another pytest-xdist worker may run its own Ray and actors meanwhile)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
                ours = title.startswith(b"ray::MapWorker(MapBatches(AnomalyCLIPPredictor))")
                ours = ours and _parent(_parent(int(entry.name))) == os.getpid()
            except (OSError, ValueError, IndexError):
                continue
            if ours:
                pids.add(int(entry.name))
    return pids


@RAY_GROUP
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor process through /proc")
def test_predict_dataset_parity_exactly_once_in_order_through_a_killed_actor(
    ray_runtime, saved_model, image_dir, listed, reference, tmp_path
):
    """A folder (listed on the driver as ``anomalyclip predict`` lists it) and more paths on two
    actors; one actor is killed once the first results are in. Ray starts a replacement, and every
    image comes back exactly once, in input order, with the single-process score and label (the
    unreadable ones as error rows), and one complete map file per scored image."""
    from anomalyclip.distributed import decode_map, predict_dataset

    good = sorted(reference)
    more = [good[i % len(good)] for i in range(16)]  # work left for the replacement actor
    expected = listed + more
    ds = predict_dataset(
        [str(image_dir), *more], saved_model, batch_size=2, concurrency=2, device="cpu", image_size=S,
        thresholds=THRESHOLDS, maps="npy", map_dir=tmp_path / "maps",
    )
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(_map_worker_pids())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rows, killed, rows_before_kill = [], None, 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows.extend(batch.to_pylist())
            if killed is None:  # the first results are in and most batches are still to come
                pids = sorted(_map_worker_pids())
                if not pids:
                    pytest.fail("no 'ray::MapWorker(MapBatches(AnomalyCLIPPredictor))' process found")
                killed, rows_before_kill = pids[0], len(rows)
                os.kill(killed, signal.SIGKILL)
    finally:
        done.set()
        watcher.join()
    assert killed is not None and rows_before_kill < len(expected) // 2  # killed mid-run
    assert not Path(f"/proc/{killed}").exists()
    assert len(seen - {killed}) >= 2, "Ray did not start a replacement for the killed actor"

    assert [r["index"] for r in rows] == list(range(len(expected)))  # each image once, input order
    assert [r["path"] for r in rows] == expected
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"] is not None}
    assert sorted(errors) == sorted(BAD) and all(BAD[k] in v for k, v in errors.items())
    scored = [r for r in rows if r["error"] is None]
    assert all(Path(r["path"]).name not in BAD for r in scored)
    for r in scored:
        ref = reference[r["path"]]
        assert abs(r["score"] - ref.score) <= TOL and r["label"] == ref.label
    assert {r["label"] for r in scored} == {0, 1}
    # One complete map per scored image (a killed write can only leave a hidden temporary file behind).
    maps = sorted((tmp_path / "maps").glob("*.npy"))
    assert [m.name for m in maps] == sorted(f"{r['index']:08d}_{Path(r['path']).stem}.npy" for r in scored)
    for m, r in zip(maps, sorted(scored, key=lambda r: r["index"])):
        assert r["map_path"] == str(m)
        np.testing.assert_allclose(decode_map(m), reference[r["path"]].anomaly_map, atol=TOL)


@RAY_GROUP
def test_predict_dataset_takes_ray_datasets(ray_runtime, saved_model, reference):
    """A ``read_images`` dataset (arrays of mixed sizes) through ``predict_dataset``, the maps inline
    as 16-bit PNG (the default); and ``read_binary_files`` (bytes: the same decode as a file) in the
    batches Ray hands to ``map_batches`` (``batch_format="numpy"``), scored by the predictor class
    in this process: a second actor pool would only start another process to load the same model."""
    from anomalyclip.distributed import AnomalyCLIPPredictor, decode_map, predict_dataset

    ray = ray_runtime
    good = sorted(reference)
    rgb = [p for p in good if Image.open(p).mode == "RGB"]
    assert len({Image.open(p).size for p in rgb}) > 1
    images = ray.data.read_images(rgb, include_paths=True)  # arrays of different shapes per row
    out = predict_dataset(images, saved_model, batch_size=4, device="cpu", image_size=S)
    rows = sorted(out.take_all(), key=lambda r: r["path"])
    assert [r["path"] for r in rows] == rgb
    for r in rows:
        ref = reference[r["path"]]
        assert r["error"] is None and abs(r["score"] - ref.score) <= TOL
        assert abs(decode_map(r["map_png"]) - ref.anomaly_map).max() <= 1 / 65535

    binary = ray.data.read_binary_files(good, include_paths=True)
    predictor = AnomalyCLIPPredictor(saved_model, device="cpu", image_size=S, maps=None, io_threads=0)
    batches = list(binary.iter_batches(batch_size=4, batch_format="numpy"))
    assert all(isinstance(b["bytes"][0], bytes) for b in batches)
    rows = sorted((r for b in batches for r in predictor(b).to_pylist()), key=lambda r: r["path"])
    assert [r["path"] for r in rows] == good
    for r in rows:
        assert r["error"] is None and abs(r["score"] - reference[r["path"]].score) <= TOL


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@RAY_GROUP
def test_cli_ray_writes_the_single_process_files(ray_runtime, saved_model, tmp_path):
    import pyarrow.parquet as pq

    from anomalyclip.cli import main

    images = tmp_path / "images"
    _write_images(images)
    common = ["--model", str(saved_model), "--image-size", str(S)]
    common += ["--threshold", str(THRESHOLDS["image"]), "--pixel-threshold", str(THRESHOLDS["pixel"])]
    assert main(["-q", "predict", str(images), "--out", str(tmp_path / "single"), *common]) == 0
    assert main(["-q", "predict", str(images), "--out", str(tmp_path / "ray"), "--ray", "--workers", "2", "--batch-size", "2", *common]) == 0

    single, ray_rows = _read_csv(tmp_path / "single" / "scores.csv"), _read_csv(tmp_path / "ray" / "scores.csv")
    assert list(ray_rows[0]) == list(single[0]) == ["image", "score", "overlay", "label", "anomalous_fraction", "error"]
    assert max(abs(float(a["anomalous_fraction"]) - float(b["anomalous_fraction"])) for a, b in zip(ray_rows, single)) <= 1e-3
    assert [(r["image"], r["overlay"], r["label"]) for r in ray_rows] == [(r["image"], r["overlay"], r["label"]) for r in single]
    assert max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(ray_rows, single)) <= TOL
    ray_json = json.loads((tmp_path / "ray" / "scores.json").read_text())
    assert ray_json[0].keys() == json.loads((tmp_path / "single" / "scores.json").read_text())[0].keys()
    for r in single:
        # The same overlays, except where a map value differing by ~1e-7 (other batch size and
        # thread count) falls on the other side of a colour level: one jet step (<= 4 per
        # channel) at alpha 0.5, on a few pixels.
        a = np.asarray(Image.open(tmp_path / "single" / r["overlay"]), dtype=int)
        b = np.asarray(Image.open(tmp_path / "ray" / r["overlay"]), dtype=int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2 and (a != b).any(axis=2).mean() < 1e-3
    table = pq.read_table(tmp_path / "ray" / "scores.parquet")
    assert table.column_names == ["image", "score", "overlay", "label", "anomalous_fraction", "error"]
    assert table.column("image").to_pylist() == [r["image"] for r in single]
    assert np.allclose(table.column("score").to_numpy(), [float(r["score"]) for r in single], atol=TOL)

    # An unreadable image is an error row, counted; the others are still scored (without
    # --workers: the 8 images fill one batch of the default 8, so one actor).
    (images / "zz_broken.png").write_bytes(b"garbage")
    assert main(["-q", "predict", str(images), "--out", str(tmp_path / "ray2"), "--ray", *common]) == 1
    rows = _read_csv(tmp_path / "ray2" / "scores.csv")
    assert len(rows) == len(single) + 1 and list(rows[0])[-1] == "error"
    assert [(r["image"], r["label"]) for r in rows[:-1]] == [(r["image"], r["label"]) for r in single]
    assert max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(rows, single)) <= TOL
    broken = [r for r in rows if r["error"]]
    assert [r["image"] for r in broken] == [str(images / "zz_broken.png")] and broken[0]["score"] == ""
    assert "Cannot read image" in broken[0]["error"]
    assert pq.read_table(tmp_path / "ray2" / "scores.parquet").column("error").null_count == len(single)


@RAY_GROUP
def test_cli_ray_reports_a_model_the_actors_cannot_load(ray_runtime, tmp_path, capsys):
    """The actor's own error reaches the user as one line (exit 2), not as a Ray stack trace."""
    from anomalyclip.cli import main

    code = main(["-q", "predict", str(IMAGE_A), "--model", "test-org/not-cached", "--out", str(tmp_path), "--ray"])
    assert code == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("anomalyclip predict:")]
    assert len(ours) == 1  # Ray logs its own lines around it
    assert ours[0].startswith("anomalyclip predict: error: Cannot load Hub repo 'test-org/not-cached'")
