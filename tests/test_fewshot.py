"""Few-shot normal references: the fusion against independent computations (the official golden
tokens, torch.cdist, scipy's blur), the chunked search, the coreset, the API, persistence, and the
few-shot protocol end to end through ``anomalyclip evaluate --shots``."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from scipy.ndimage import gaussian_filter

from anomalyclip import AnomalyCLIP, CheckpointError, DatasetError, InvalidInputError, Thresholds, evaluate, load_dataset
from anomalyclip.cli import main
from anomalyclip.data.datasets import draw_shots, load_reference_pool
from anomalyclip.data.synthetic import make_synthetic_arrays, make_synthetic_dataset
from anomalyclip.references import (
    REFERENCES_NAME,
    ReferenceMemory,
    greedy_coreset,
    nearest_neighbor_distance,
)
from anomalyclip.reference_search import _block_rows

from .conftest import IMAGE_A, IMAGE_B, OFFICIAL_PTH, TINY_CLIP_REF

SIZE = 112  # processing size of the small tests: 8 x 8 patches of the tiny CLIP
GRID = SIZE // 14
MULTI = (6, 12, 18, 24)


@pytest.fixture(scope="module")
def small_model(tiny_clip):
    """Golden prompts at S = 112 with four output layers (module-scoped: reset references after use)."""
    return AnomalyCLIP.from_official_checkpoint(
        OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=SIZE, feature_layers=MULTI
    )


@pytest.fixture
def model(small_model):
    small_model.clear_references()
    yield small_model
    small_model.clear_references()


def _textures(n: int, seed: int = 0, size: int = 96) -> list[np.ndarray]:
    images, _, _ = make_synthetic_arrays(n, 0, (size, size), seed, class_name="texture_a")
    return list(images)


def _cdist_distance(test_tokens: torch.Tensor, memory_tokens: torch.Tensor) -> torch.Tensor:
    """1 - max cosine similarity, with torch.cdist on L2-normalized vectors: |a - b|^2 = 2 - 2 cos."""
    a = test_tokens / test_tokens.norm(dim=-1, keepdim=True)
    b = memory_tokens / memory_tokens.norm(dim=-1, keepdim=True)
    d2 = torch.cdist(a.double(), b.double()) ** 2
    return (d2.min(dim=1).values / 2.0).float()  # 1 - max cos = min |a - b|^2 / 2


# ----------------------------------------------------------------------------- the fusion
def test_fusion_on_the_official_golden_tokens(fresh_model, golden):
    """Image B as the only reference, image A tested, layer 24, S = 518: every input of the
    expected values comes from the official implementation's outputs (golden file)."""
    fresh_model.add_references(IMAGE_B)
    with torch.inference_mode():
        out = fresh_model(fresh_model.preprocess(IMAGE_A))

    memory = golden["b.top.patch_tokens.24"][0, 1:]
    test = golden["a.top.patch_tokens.24"][0, 1:]
    distance = _cdist_distance(test, memory)  # [37 * 37]
    grid = distance.reshape(1, 1, 37, 37)
    reference_raw = F.interpolate(grid, size=(518, 518), mode="bilinear", align_corners=False)[0, 0].numpy()
    zero_shot_raw = golden["a.top.anomaly_map_raw"][0].numpy()
    expected_map = gaussian_filter(zero_shot_raw + reference_raw, 4)
    expected_score = (float(golden["a.top.score"]) + float(distance.max()) / 2) / 2

    assert float((out.anomaly_maps[0] - torch.from_numpy(expected_map)).abs().max()) < 1e-3
    assert abs(float(out.scores[0]) - expected_score) < 1e-4
    assert abs(float(out.reference_scores[0]) - float(distance.max()) / 2) < 1e-4
    assert float((out.reference_maps[0] - torch.from_numpy(gaussian_filter(reference_raw, 4))).abs().max()) < 1e-3
    # The zero-shot part is the golden zero-shot output.
    assert float((out.zero_shot_maps[0] - golden["a.top.anomaly_map"][0]).abs().max()) < 1e-3
    assert abs(float(out.zero_shot_scores[0]) - float(golden["a.top.score"])) < 1e-4


def test_fusion_over_four_layers_matches_explicit_loops(model):
    """The plain-sum fusion (the standardized one: tests/test_fusion.py)."""
    refs = _textures(2, seed=1)
    tests = [*_textures(1, seed=2), np.asarray(Image.open(IMAGE_A).convert("RGB"))]
    model.add_references(refs, fusion="sum")
    pixel_values = model.preprocess(tests)
    with torch.inference_mode():
        out = model(pixel_values)
        ref_features = model.encode_image(model.preprocess(refs)).patch_features
        test_features = model.encode_image(pixel_values).patch_features
    model.clear_references()
    with torch.inference_mode():
        zero_shot = model(pixel_values)

    for i in range(len(tests)):
        reference_raw = np.zeros((SIZE, SIZE))
        per_layer_vas = []
        for layer in MULTI:
            memory = ref_features[layer][:, 1:].reshape(-1, 32)  # both reference images' patches
            distance = _cdist_distance(test_features[layer][i, 1:], memory)
            per_layer_vas.append(distance / 2)
            grid = distance.reshape(1, 1, GRID, GRID)
            reference_raw += F.interpolate(grid, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()
        fused_raw = zero_shot.raw_anomaly_maps[i].numpy() + reference_raw
        reference_score = float(torch.stack(per_layer_vas).mean(dim=0).max())
        assert np.abs(out.raw_anomaly_maps[i].numpy() - fused_raw).max() < 1e-5
        assert np.abs(out.anomaly_maps[i].numpy() - gaussian_filter(fused_raw, 4)).max() < 1e-5
        assert abs(float(out.scores[i]) - (float(zero_shot.scores[i]) + reference_score) / 2) < 1e-6
    # Zero-shot outputs are untouched by the references (bit for bit).
    assert torch.equal(out.zero_shot_scores, zero_shot.scores)
    assert torch.equal(out.zero_shot_maps, zero_shot.anomaly_maps)
    assert zero_shot.reference_scores is None and zero_shot.reference_maps is None
    assert zero_shot.zero_shot_scores is zero_shot.scores
    # The blur is linear: the fused map is the zero-shot map plus the reference map.
    assert float((out.anomaly_maps - out.zero_shot_maps - out.reference_maps).abs().max()) < 1e-5


def test_a_reference_image_is_its_own_nearest_neighbour(model):
    image = _textures(1, seed=5)[0]
    model.add_references(image)
    with torch.inference_mode():
        out = model(model.preprocess(image))
    assert float(out.reference_scores[0]) < 1e-4  # every patch finds itself
    assert float(out.reference_maps.abs().max()) < 1e-3


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("chunk_elements", [1, 7, 64, 1000, 1 << 24])
def test_chunked_search_matches_cdist(chunk_elements):
    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(37, 16, generator=g), dim=-1)
    memory = F.normalize(torch.randn(53, 16, generator=g), dim=-1)
    got = nearest_neighbor_distance(queries, memory, chunk_elements=chunk_elements)
    assert torch.allclose(got, _cdist_distance(queries, memory), atol=1e-5)
    half = nearest_neighbor_distance(queries, memory.half(), chunk_elements=chunk_elements)
    assert float((half - got).abs().max()) < 2e-3  # float16 storage


def test_search_blocks_respect_the_budget():
    for queries in (1, 5, 1369, 10952):
        for memory in (1, 3, 5476, 136900):
            for budget in (1, 10, 4096, 1 << 24):
                q_rows, m_rows = _block_rows(queries, memory, budget)
                assert 1 <= q_rows <= queries and 1 <= m_rows <= memory
                assert q_rows * m_rows <= max(budget, 1)


def test_search_never_computes_a_block_above_the_budget(monkeypatch):
    """Every similarity block the search multiplies out stays within chunk_elements."""
    sizes = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    queries = F.normalize(torch.randn(100, 8), dim=-1)
    memory = F.normalize(torch.randn(300, 8), dim=-1)
    nearest_neighbor_distance(queries, memory, chunk_elements=1000)
    assert sizes and max(sizes) <= 1000 and len(sizes) >= 30


def _naive_k_center(x: np.ndarray, first: int, n: int) -> list[int]:
    chosen = [first]
    for _ in range(n - 1):
        d = np.min([((x - x[c]) ** 2).sum(axis=1) for c in chosen], axis=0)
        chosen.append(int(np.argmax(d)))
    return chosen


def test_greedy_coreset_is_k_center_greedy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g)
    picked = greedy_coreset(x, 20, projection_dim=None, seed=3)
    assert picked.tolist() == _naive_k_center(x.double().numpy(), int(picked[0]), 20)
    assert len(set(picked.tolist())) == 20
    # Its covering radius beats a random subset's of the same size.
    def radius(idx):
        return float(torch.cdist(x, x[idx]).min(dim=1).values.max())

    assert radius(picked) < radius(torch.randperm(200, generator=g)[:20])
    # With the random projection: deterministic for a seed, and valid indices.
    projected = greedy_coreset(F.normalize(torch.randn(500, 300, generator=g), dim=-1), 50, seed=0)
    assert projected.unique().numel() == 50
    with pytest.raises(InvalidInputError, match="n_select"):
        greedy_coreset(x, 0)


def test_coreset_and_float16_storage_on_the_model(model):
    refs = _textures(3, seed=7)
    model.add_references(refs, coreset=0.25, storage_dtype="float16")
    memory = model.references
    assert memory.storage_dtype == torch.float16
    assert len(memory) == math.ceil(0.25 * 3 * GRID**2) and memory.num_images == 3
    assert set(memory.memories) == set(MULTI)
    full = AnomalyCLIP.from_official_checkpoint(
        OFFICIAL_PTH, clip=model.clip, backbone=TINY_CLIP_REF, device="cpu", image_size=SIZE, feature_layers=MULTI
    )
    full.add_references(refs)
    with torch.inference_mode():
        px = model.preprocess(_textures(1, seed=8))
        kept, every = model(px), full(px)
    # A subset of the memory can only be farther away, and not by much for a 25 % coreset.
    assert float((kept.reference_maps - every.reference_maps).min()) > -2e-3
    assert float(kept.reference_scores[0]) >= float(every.reference_scores[0]) - 1e-3


# ----------------------------------------------------------------------------- API
def test_add_and_clear_references_accepts_predict_inputs(model, tmp_path):
    folder = tmp_path / "normal"
    (folder / "sub").mkdir(parents=True)
    arrays = _textures(3, seed=9)
    Image.fromarray(arrays[0]).save(folder / "a.png")
    Image.fromarray(arrays[1]).save(folder / "sub" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    assert model.num_references == 0 and model.references is None
    assert model.add_references(folder) == 2  # a folder, searched recursively
    assert model.add_references([Image.fromarray(arrays[2]), arrays[2].astype(np.float32) / 255]) == 4
    assert model.add_references(torch.from_numpy(arrays[2]).permute(2, 0, 1)) == 5
    assert len(model.references) == 5 * GRID**2
    result = model.predict(IMAGE_A)
    with torch.inference_mode():
        out = model(model.preprocess(IMAGE_A))
    assert result.score == pytest.approx(float(out.scores[0]), abs=1e-7)
    model.clear_references()
    assert model.num_references == 0 and model.references is None
    with torch.inference_mode():
        assert model(model.preprocess(IMAGE_A)).reference_maps is None


def test_calibrate_uses_the_fused_outputs(model):
    normals = _textures(3, seed=21)
    zero_shot = model.calibrate(normals, quantile=0.9)
    model.add_references(_textures(2, seed=22))
    fused = model.calibrate(normals, quantile=0.9)
    with torch.inference_mode():
        out = model(model.preprocess(normals))
    assert fused.image == pytest.approx(float(np.quantile(out.scores.numpy(), 0.9)), abs=1e-6)
    assert fused.pixel == pytest.approx(float(np.quantile(out.anomaly_maps.numpy(), 0.9)), abs=1e-5)
    assert zero_shot.pixel > 1.0 and 0.0 < fused.pixel < 1.0 == model.map_range[1]  # the standardized map's scale


def test_reference_errors(model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="No image files"):
        model.add_references(tmp_path / "empty")
    with pytest.raises(InvalidInputError, match="no images"):
        model.add_references([])
    with pytest.raises(InvalidInputError, match="coreset"):
        model.add_references(IMAGE_B, coreset=1.5)
    with pytest.raises(InvalidInputError, match="float32 or float16"):
        model.add_references(IMAGE_B, storage_dtype="bfloat16")
    assert model.num_references == 0  # nothing half-added
    model.add_references(IMAGE_B)
    with pytest.raises(InvalidInputError, match="tile_size"):
        model.add_references(IMAGE_B, tile_size=112)
    with pytest.raises(InvalidInputError, match="storage dtype"):
        model.add_references(IMAGE_B, storage_dtype="float16")
    with pytest.raises(InvalidInputError, match="ReferenceMemory"):
        model.references = "memory"


def test_changed_settings_never_mix_with_references(model, caplog, tmp_path):
    model.add_references(IMAGE_B)
    with caplog.at_level("WARNING", logger="anomalyclip.model"):
        model.reconfigure(image_size=224)
    assert "image_size 112" in caplog.text
    dpam_layers = model.config.dpam_layers
    try:
        with pytest.raises(InvalidInputError, match=r"image_size 112 \(the model now has 224\).*clear_references"):
            model.predict(IMAGE_A)
        with pytest.raises(InvalidInputError, match="image_size 112"):
            model.save_pretrained(tmp_path / "stale")  # never writes a profile that cannot run
        assert not (tmp_path / "stale").exists()
        model.reconfigure(image_size=SIZE, feature_layers=(24,))
        with pytest.raises(InvalidInputError, match="feature_layers"):
            model.predict(IMAGE_A)
        with pytest.raises(InvalidInputError, match="feature_layers"):
            model.add_references(IMAGE_B)
        model.reconfigure(feature_layers=MULTI, dpam_layers=dpam_layers - 1)
        with pytest.raises(InvalidInputError, match=r"dpam_layers \d+ \(the model now has \d+\)"):
            model.predict(IMAGE_A)  # DPAM changes the patch tokens too
    finally:
        model.reconfigure(image_size=SIZE, feature_layers=MULTI, dpam_layers=dpam_layers)
    model.predict(IMAGE_A)  # back to the settings of the references


# ----------------------------------------------------------------------------- persistence
def test_references_round_trip_through_save_pretrained(model, tmp_path):
    model.add_references(_textures(2, seed=11), storage_dtype="float16")
    out = model.save_pretrained(tmp_path / "profile")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", REFERENCES_NAME]
    tensors = load_file(str(out / REFERENCES_NAME))
    assert sorted(tensors) == ["fusion_statistics"] + [f"layer_{layer}" for layer in sorted(MULTI, key=str)]
    assert tensors["layer_24"].shape == (2 * GRID**2, 32) and tensors["layer_24"].dtype == torch.float16
    loaded = AnomalyCLIP.from_pretrained(out, device="cpu")
    assert loaded.num_references == 2 and loaded.references.feature_layers == MULTI
    dpam = (model.config.dpam_layers, model.config.dpam_mode)
    assert (loaded.references.dpam_layers, loaded.references.dpam_mode) == dpam
    for layer in MULTI:
        assert torch.equal(loaded.references.memories[layer], model.references.memories[layer])
    px = model.preprocess(IMAGE_A)
    with torch.inference_mode():
        a, b = model(px), loaded(px)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.anomaly_maps, b.anomaly_maps)

    # A profile loaded with other settings refuses to mix: a clear error at use.
    other = AnomalyCLIP.from_pretrained(out, device="cpu", image_size=224)
    with pytest.raises(InvalidInputError, match="clear_references"):
        other.predict(IMAGE_A)
    other.clear_references()
    assert other.predict(IMAGE_A).anomaly_map.shape == (300, 400)

    # Saving a model without references into that folder removes the stale file (from_pretrained
    # loads references exactly when the file is there, as above).
    model.clear_references()
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_references_files_without_dpam_settings_still_load(model, tmp_path):
    """Files written before the DPAM settings were recorded: loaded, those settings unchecked."""
    from safetensors.torch import save_file

    model.add_references(IMAGE_B)
    memory = model.references
    meta = {k: v for k, v in memory.metadata().items() if k not in ("dpam_layers", "dpam_mode")}
    save_file({f"layer_{k}": v.contiguous() for k, v in memory.memories.items()}, str(tmp_path / "old.safetensors"), metadata=meta)
    old = ReferenceMemory.load(tmp_path / "old.safetensors")
    assert (old.dpam_layers, old.dpam_mode) == (None, None)
    settings = model._reference_settings()
    assert old.mismatches(**{**settings, "dpam_layers": 3, "dpam_mode": "qq"}) == []
    assert [m[0] for m in memory.mismatches(**{**settings, "dpam_layers": 3, "dpam_mode": "qq"})] == ["dpam_layers", "dpam_mode"]


def test_corrupt_references_file_is_a_checkpoint_error(model, tmp_path):
    model.add_references(IMAGE_B)
    out = model.save_pretrained(tmp_path / "p")
    tensors = load_file(str(out / REFERENCES_NAME))
    from safetensors.torch import save_file

    save_file({k: v * 3 for k, v in tensors.items()}, str(out / REFERENCES_NAME), metadata=model.references.metadata())
    with pytest.raises(CheckpointError, match="not L2-normalized"):
        AnomalyCLIP.from_pretrained(out, device="cpu")
    (out / REFERENCES_NAME).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        ReferenceMemory.load(out / REFERENCES_NAME)


def test_references_through_the_hf_cache(hf_cache, golden_model):
    """A Hub profile with references.safetensors restores them; one without loads zero-shot."""
    from .conftest import _put_in_hf_cache

    model = AnomalyCLIP.from_pretrained("test-org/anomalyclip-tiny", device="cpu")
    assert model.num_references == 0
    model.add_references(IMAGE_B)
    saved = model.save_pretrained(hf_cache.parent / "profile")
    _put_in_hf_cache(hf_cache, "test-org/profile", {n: saved / n for n in ("config.json", "model.safetensors", REFERENCES_NAME)})
    loaded = AnomalyCLIP.from_pretrained("test-org/profile", device="cpu")
    assert loaded.num_references == 1
    assert torch.equal(loaded.references.memories[24], model.references.memories[24])


def test_push_to_hub_publishes_the_references(model, monkeypatch, tmp_path):
    from .fakehub import FakeHub

    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    model.add_references(IMAGE_B)
    model.push_to_hub("me/profile")
    files = hub.files("me/profile")
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", REFERENCES_NAME]
    assert json.loads(files["config.json"])["references"] == REFERENCES_NAME
    (tmp_path / "pushed.safetensors").write_bytes(files[REFERENCES_NAME])
    assert ReferenceMemory.load(tmp_path / "pushed.safetensors").fingerprint() == model.references.fingerprint()


# ----------------------------------------------------------------------------- data: the reference pool
@pytest.mark.parametrize("layout", ["mvtec", "visa", "meta", "folder"])
def test_reference_pool_per_layout(tmp_path, layout):
    root = make_synthetic_dataset(
        tmp_path / layout, layout=layout, classes=("texture_a", "texture_b"), n_normal=3, n_anomalous=2, n_train=4
    )
    pool = load_reference_pool(root, layout)
    assert all(s.label == 0 for s in pool)
    expected = 3 if layout == "folder" else 4  # a folder has no train split: its good/ images
    assert pool.counts() == {c: {"normal": expected, "anomalous": 0} for c in ("texture_a", "texture_b")}
    if layout != "folder":
        test_paths = {s.image_path for s in load_dataset(root, layout)}
        assert not test_paths & {s.image_path for s in pool}  # drawn from the training split only
    first = draw_shots(pool, "texture_a", 2, seed=0)
    assert first == draw_shots(pool, "texture_a", 2, seed=0)  # deterministic
    assert len({s.image_path for s in first}) == 2 and all(s.class_name == "texture_a" for s in first)
    draws = {tuple(s.image_path for s in draw_shots(pool, "texture_a", 2, seed=k)) for k in range(8)}
    assert len(draws) > 1  # the seed matters
    with pytest.raises(DatasetError, match="fewer than shots=9"):
        draw_shots(pool, "texture_a", 9)
    with pytest.raises(InvalidInputError, match="shots"):
        draw_shots(pool, "texture_a", 0)


def test_reference_pool_needs_a_training_split(tmp_path):
    root = make_synthetic_dataset(tmp_path / "m", layout="mvtec", n_normal=2, n_anomalous=2)  # no train/
    with pytest.raises(DatasetError, match="'train' split"):
        load_reference_pool(root, "mvtec")


# ----------------------------------------------------------------------------- the few-shot protocol
@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("fewshot") / "mvtec",
        layout="mvtec",
        classes=("texture_a", "texture_b"),
        n_normal=4,
        n_anomalous=4,
        n_train=6,
        seed=3,
    )


def test_evaluate_shots_matches_an_independent_computation(model, textures):
    from sklearn.metrics import roc_auc_score

    from anomalyclip.preprocessing import mask_array

    dataset = load_dataset(textures, "mvtec").subset("texture_b")
    model.add_references(IMAGE_B)  # the model's own references and thresholds survive the protocol
    own = model.references
    model.thresholds = Thresholds(image=0.4, pixel=1.5)
    report = evaluate(model, dataset, shots=2, seed=5, progress=False)
    assert model.references is own and model.thresholds == Thresholds(image=0.4, pixel=1.5)
    assert report.settings["shots"] == 2 and report.settings["seed"] == 5
    pool = load_reference_pool(textures, "mvtec")
    for name in ("texture_b",):
        drawn = draw_shots(pool, name, 2, seed=5)
        assert report.settings["reference_images"][name] == [str(s.image_path) for s in drawn]
        check = AnomalyCLIP.from_official_checkpoint(
            OFFICIAL_PTH, clip=model.clip, backbone=TINY_CLIP_REF, device="cpu", image_size=SIZE, feature_layers=MULTI
        )
        check.add_references([s.image_path for s in drawn])
        samples = list(dataset.subset(name))
        with torch.inference_mode():
            out = check(check.preprocess([s.image_path for s in samples]))
        masks = np.stack([mask_array(s.mask_path, SIZE) if s.mask_path else np.zeros((SIZE, SIZE)) for s in samples])
        labels = [s.label for s in samples]
        assert report.classes[name]["image_auroc"] == pytest.approx(roc_auc_score(labels, out.scores.numpy()), abs=1e-6)
        assert report.classes[name]["pixel_auroc"] == pytest.approx(
            roc_auc_score(masks.ravel() > 0.5, out.anomaly_maps.numpy().ravel()), abs=1e-6
        )


def test_folder_layout_holds_drawn_references_out(model, tmp_path):
    root = make_synthetic_dataset(tmp_path / "f", layout="folder", classes=("texture_a",), n_normal=4, n_anomalous=2)
    report = evaluate(model, load_dataset(root, "folder"), shots=2, progress=False)
    assert report.counts["texture_a"] == {"images": 4, "anomalous": 2}  # 6 images, 2 used as references


def test_fewshot_beats_zero_shot_through_the_cli(small_model, textures, tmp_path, capsys):
    """The acceptance check of the issue: on the tiny random CLIP, 4 normal shots lift pixel AUROC
    from below 0.7 to well above 0.8 (same data, model and metrics; only --shots differs).

    At the model's S = 112 (8 x 8 patches; a quarter of the work at 224): zero-shot pixel AUROC
    0.35, four shots 0.99 for either seed and class (measured; the bars below leave >= 0.1)."""
    small_model.clear_references()
    model_dir = small_model.save_pretrained(tmp_path / "model")
    base = ["-q", "evaluate", "--model", str(model_dir), "--data", str(textures), "--format", "mvtec"]
    assert main([*base, "--out", str(tmp_path / "zero")]) == 0
    zero = json.loads((tmp_path / "zero" / "metrics.json").read_text())
    assert zero["settings"]["shots"] == 0 and zero["settings"]["seed"] is None
    assert zero["mean"]["pixel_auroc"] < 0.7
    for seed in (0, 1):  # two draws of the shots: the bar holds for both, not for one lucky draw
        out = tmp_path / f"four-{seed}"
        assert main([*base, "--out", str(out), "--shots", "4", "--seed", str(seed)]) == 0
        four = json.loads((out / "metrics.json").read_text())
        assert four["settings"]["shots"] == 4 and four["settings"]["seed"] == seed
        assert four["mean"]["pixel_auroc"] > 0.85
        assert four["mean"]["pixel_auroc"] > zero["mean"]["pixel_auroc"] + 0.25
        for name in ("texture_a", "texture_b"):
            assert four["classes"][name]["pixel_auroc"] > 0.8
        assert four["mean"]["image_auroc"] >= zero["mean"]["image_auroc"]
    capsys.readouterr()


def test_cli_predict_with_references(small_model, converted_small, tmp_path, capsys):
    normal = tmp_path / "normal"
    normal.mkdir()
    for i, image in enumerate(_textures(2, seed=13)):
        Image.fromarray(image).save(normal / f"{i}.png")
    test = tmp_path / "test.png"
    shutil.copyfile(IMAGE_A, test)
    out = tmp_path / "out"
    args = ["-q", "predict", str(test), "--model", str(converted_small), "--out", str(out)]
    assert main([*args, "--references", str(normal)]) == 0
    score = json.loads((out / "scores.json").read_text())[0]["score"]
    small_model.add_references(normal)  # the same prompts and settings as the saved model
    assert score == pytest.approx(small_model.predict(test).score, abs=1e-6)
    small_model.clear_references()
    assert main([*args, "--references", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


@pytest.fixture
def converted_small(small_model, tmp_path):
    small_model.clear_references()
    return small_model.save_pretrained(tmp_path / "small")
