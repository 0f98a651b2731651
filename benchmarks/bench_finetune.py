"""Time per training epoch of ``finetune`` with and without the feature cache.

Builds a synthetic auxiliary set (``anomalyclip.data.synthetic``, MVTec-like folder layout, half the
images anomalous with masks) and trains fresh prompts with the paper's settings (Adam 1e-3,
batch 8) on a backbone, once per cache mode:

- ``none``: the vision encoder runs on every batch of every epoch (the official loop);
- ``memory``: every image is encoded once into an in-memory cache (timed separately as "fill"),
  then each epoch costs only the text encoder and the losses;
- ``disk``: the same with the on-disk cache, first cold (filled in this run), then warm (a second
  run that finds every entry on disk);
- ``memory-fp16``: the in-memory cache in float16 (half the memory).

Per mode it reports the cache fill time, the mean epoch time (over all epochs; with a cache
every epoch is alike), the time of the first epoch including the fill, and the final loss (the
modes must agree up to float rounding: the cache changes the cost, not the training).

The default backbone is the tiny random CLIP of the test fixtures (24 vision blocks like
ViT-L/14, width 128), so the figures show the structure of the cost, not ViT-L's absolute
numbers; ``--backbone vit-l-random`` builds a ViT-L-14-336-sized CLIP with random weights (no
download) and ``--backbone hf-hub:...`` loads a real one.

Usage::

    python benchmarks/bench_finetune.py                                   # tiny CLIP, 518 px, 48 images, 3 epochs
    python benchmarks/bench_finetune.py --images 96 --epochs 5 --threads 2 --json out.json
    python benchmarks/bench_finetune.py --backbone vit-l-random --device cuda --images 64
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from anomalyclip import AnomalyCLIP
from anomalyclip.backbone import load_clip
from anomalyclip.data.datasets import load_dataset
from anomalyclip.data.synthetic import make_synthetic_dataset
from anomalyclip.train.finetune import finetune

TINY_CLIP = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "tiny-clip"
MODES = ("none", "memory", "disk", "memory-fp16")


def build_model(backbone: str, image_size: int, device: str) -> AnomalyCLIP:
    """Fresh prompts (seed 0) on the requested backbone."""
    if backbone == "tiny":
        ref = f"local-dir:{TINY_CLIP}"
        clip = load_clip(ref)
    elif backbone == "vit-l-random":
        import open_clip

        ref = "ViT-L-14-336 (random)"
        clip = open_clip.create_model("ViT-L-14-336", pretrained=None, force_quick_gelu=True)
    else:
        ref = backbone
        clip = load_clip(backbone)
    model = AnomalyCLIP.from_clip(clip, backbone=ref, image_size=image_size, seed=0)
    return model.to(device)


def run(
    model: AnomalyCLIP,
    initial: dict[str, torch.Tensor],
    data: Any,
    mode: str,
    args: argparse.Namespace,
    cache_dir: Path,
) -> dict[str, Any]:
    """Train from the ``initial`` prompts with one cache mode; return its timings."""
    model.prompts.load_state_dict(initial)
    feature_cache = {"none": None, "memory": "memory", "disk": "disk", "memory-fp16": "memory"}[mode]
    cache_dtype = "float16" if mode == "memory-fp16" else None
    started = time.perf_counter()
    history = finetune(
        model,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        feature_cache=feature_cache,
        cache_dtype=cache_dtype,
        cache_dir=cache_dir,
        num_workers=args.workers,
        progress=False,
    )
    total = time.perf_counter() - started
    epoch_times = [e.seconds for e in history.epochs]
    return {
        "mode": mode,
        "fill_s": history.cache_seconds,
        "encoded_in_fill": history.cache_encoded,
        "epoch_s_mean": sum(epoch_times) / len(epoch_times),
        "epoch_s": epoch_times,
        "first_epoch_with_fill_s": history.cache_seconds + epoch_times[0],
        "total_s": total,
        "cache_bytes": history.cache_bytes,
        "final_loss": history.losses[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="'tiny' (test fixture), 'vit-l-random', or an open_clip reference")
    parser.add_argument("--images", type=int, default=48, help="images in the synthetic set, half anomalous (default 48)")
    parser.add_argument("--image-size", type=int, default=518, help="processing size S (default 518, the paper's)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the synthetic PNGs (default 256)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {MODES}")

    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_dataset(
            Path(tmp) / "data",
            layout="mvtec",
            classes=("texture_a", "texture_b"),
            n_normal=args.images // 4,
            n_anomalous=args.images // 2 - args.images // 4,
            size=(args.source_size, args.source_size),
            seed=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = load_dataset(root, "mvtec")
        model = build_model(args.backbone, args.image_size, args.device)
        initial = {k: v.clone() for k, v in model.prompts.state_dict().items()}
        results = []
        for mode in modes:
            results.append(run(model, initial, data, mode, args, Path(tmp) / "cache"))
            if mode == "disk":
                warm = run(model, initial, data, mode, args, Path(tmp) / "cache")
                warm["mode"] = "disk (warm)"
                results.append(warm)

    info = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "backbone": args.backbone,
        "images": len(data),
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "results": results,
    }
    print(
        f"finetune epoch times: {args.backbone} backbone, {len(data)} images at {args.image_size} px, batch "
        f"{args.batch_size}, {args.epochs} epochs, {args.device}, {torch.get_num_threads()} threads"
    )
    print(f"{'mode':<14}{'fill (s)':>10}{'epoch (s)':>11}{'1st epoch+fill':>16}{'cache (MB)':>12}{'final loss':>12}")
    for r in results:
        print(
            f"{r['mode']:<14}{r['fill_s']:>10.2f}{r['epoch_s_mean']:>11.2f}{r['first_epoch_with_fill_s']:>16.2f}"
            f"{r['cache_bytes'] / 1e6:>12.1f}{r['final_loss']:>12.5f}"
        )
    base = next((r for r in results if r["mode"] == "none"), None)
    if base is not None:
        for r in results:
            if r["mode"] != "none":
                print(f"speed-up per epoch, {r['mode']} vs none: {base['epoch_s_mean'] / r['epoch_s_mean']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
