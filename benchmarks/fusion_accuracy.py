"""Accuracy of the few-shot fusion rules, side by side with their two parts (the table of
``docs/fewshot.md``).

On the tiny random CLIP of the test fixtures (golden prompts; its zero-shot map is weak, as a
real model's is on an unfamiliar product) and the synthetic textures of
``anomalyclip.data.synthetic``, with the protocol of ``anomalyclip evaluate --shots K``
(references drawn by ``draw_shots`` from each class's training split, every test image of the
class scored), it reports per class and shot count the image / pixel AUROC of:

- ``zero-shot``: ``zero_shot_scores`` / ``zero_shot_maps`` (the model without references);
- ``reference``: ``reference_scores`` / ``reference_maps`` (the reference part alone);
- ``sum``: the fused output with ``fusion="sum"`` (APRIL-GAN / WinCLIP+);
- ``standardized``: the fused output with ``fusion="standardized"``;

averaged over the draw seeds (rows are printed as they finish, then the whole table). It also scores the golden fixtures (image A, with its mask,
against image B and B turned by 90 degrees as the references, at the default S = 518, layer 24).
Accuracy, not time: the machine's load does not matter.

Usage::

    python benchmarks/fusion_accuracy.py                     # the docs' table
    python benchmarks/fusion_accuracy.py --shots 2 4 --seeds 0 1 2 --json fusion.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalyclip import AnomalyCLIP, load_dataset
from anomalyclip.backbone import load_clip
from anomalyclip.data.datasets import draw_shots, load_reference_pool
from anomalyclip.data.synthetic import make_synthetic_dataset
from anomalyclip.preprocessing import mask_array

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden"
TINY_CLIP_REF = f"local-dir:{GOLDEN / 'tiny-clip'}"
OFFICIAL_PTH = GOLDEN / "official_prompt_learner.pth"
RULES = ("zero-shot", "reference", "sum", "standardized")


def part_outputs(model: AnomalyCLIP, references: list, images: list) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """rule -> (scores [N], maps [N, S, S]) of ``images`` with ``references`` added under each fusion."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for fusion in ("sum", "standardized"):
        model.clear_references()
        model.add_references(references, fusion=fusion)
        with torch.inference_mode():
            result = model(model.preprocess(images))
        out[fusion] = (result.scores.numpy(), result.anomaly_maps.numpy())
        out["zero-shot"] = (result.zero_shot_scores.numpy(), result.zero_shot_maps.numpy())
        out["reference"] = (result.reference_scores.numpy(), result.reference_maps.numpy())
    model.clear_references()
    return out


def aurocs(outputs: dict, labels: np.ndarray, masks: np.ndarray) -> dict[str, dict[str, float]]:
    """rule -> {"image": AUROC or nan (one class only), "pixel": AUROC}."""
    result = {}
    for rule in RULES:
        scores, maps = outputs[rule]
        image = float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")
        result[rule] = {"image": image, "pixel": float(roc_auc_score(masks.ravel() > 0.5, maps.ravel()))}
    return result


def synthetic(model: AnomalyCLIP, root: Path, shots: list[int], seeds: list[int]) -> Iterator[tuple[str, dict]]:
    """Yields ``(row name, rule -> {"image", "pixel"} AUROC averaged over the seeds)`` per class and K."""
    dataset = load_dataset(root, "mvtec")
    pool = load_reference_pool(root, "mvtec")
    size = model.config.image_size
    for name in dataset.classes:
        samples = list(dataset.subset(name))
        images = [str(s.image_path) for s in samples]
        labels = np.array([s.label for s in samples])
        masks = np.stack([mask_array(s.mask_path, size) if s.mask_path else np.zeros((size, size)) for s in samples])
        for k in shots:
            runs = []
            for seed in seeds:
                drawn = [str(s.image_path) for s in draw_shots(pool, name, k, seed=seed)]
                runs.append(aurocs(part_outputs(model, drawn, images), labels, masks))
            yield f"{name} {k}-shot", {
                rule: {m: float(np.mean([r[rule][m] for r in runs])) for m in ("image", "pixel")} for rule in RULES
            }


def golden_references() -> list[np.ndarray]:
    """Two normal versions of golden image A (400 x 300 noise with a dark line in rows ~75-155):
    the line's band covered with a line-free band of the same image, once as is, once mirrored."""
    image = np.asarray(Image.open(GOLDEN / "image_a.png").convert("RGB")).copy()
    first = image.copy()
    first[60:170] = image[180:290]
    second = image.copy()
    second[50:160] = image[185:295]
    return [first, np.ascontiguousarray(second[:, ::-1])]


def golden(clip) -> dict:
    """Golden image A (pixel AUROC against its mask) with :func:`golden_references`, at the
    default S = 518 and output layer 24."""
    model = AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=clip, backbone=TINY_CLIP_REF, device="cpu")
    outputs = part_outputs(model, golden_references(), [str(GOLDEN / "image_a.png")])
    mask = mask_array(GOLDEN / "mask_a.png", model.config.image_size)[None]
    return {"golden A, 2 line-free copies of A": aurocs(outputs, np.array([1]), mask)}


def markdown(table: dict) -> str:
    lines = [
        "| set | " + " | ".join(f"{r} image / pixel" for r in RULES) + " |",
        "|---|" + "---|" * len(RULES),
    ]
    for row, values in table.items():
        cells = []
        for rule in RULES:
            image, pixel = values[rule]["image"], values[rule]["pixel"]
            cells.append(("-" if np.isnan(image) else f"{image:.3f}") + f" / {pixel:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[3, 7], help="seeds of the synthetic sets")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--golden-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    clip = load_clip(TINY_CLIP_REF)
    model = AnomalyCLIP.from_official_checkpoint(
        OFFICIAL_PTH, clip=clip, backbone=TINY_CLIP_REF, device="cpu", image_size=args.image_size, feature_layers=(6, 12, 18, 24)
    )
    table: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for data_seed in [] if args.golden_only else args.data_seeds:
            root = make_synthetic_dataset(
                Path(tmp) / f"set{data_seed}", layout="mvtec", classes=("texture_a", "texture_b"),
                n_normal=4, n_anomalous=4, n_train=6, seed=data_seed,
            )  # fmt: skip
            for row, values in synthetic(model, root, args.shots, args.seeds):
                table[f"synthetic seed {data_seed}: {row}"] = values
                print(markdown({f"synthetic seed {data_seed}: {row}": values}).splitlines()[-1], flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(table, indent=2))
    table.update(golden(clip))
    print(markdown(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
