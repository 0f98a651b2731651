"""How far reduced-precision inference lands from float32, on the golden fixtures.

Loads the golden model (``tests/fixtures/golden``: the official-format prompt checkpoint on the
tiny CLIP, built by open_clip from its ``local-dir:`` layout, S = 518), runs ``image_a`` and
``image_b`` in float32 and in each requested dtype on the same device, and prints the largest
absolute differences of the image scores, the final anomaly maps (at S x S, values in [0, 1] per
output layer, summed over layers) and the normalized global features, for the paper's output
layer 24 (``top``) and for layers 6, 12, 18, 24 (``multi``). The float32 run is also compared with
the official implementation's golden outputs.

``--large`` adds the same comparison on a ViT-L-14-336-sized CLIP with random weights (no download;
built on the GPU when ``--device cuda``) at S = 518 on random images: the paper's model size,
though not its weights. ``--image-size`` runs the golden images at another size (quick dry runs;
the official golden outputs exist only for 518, so that comparison is left out).

Usage::

    python benchmarks/precision_deviation.py                       # bfloat16 vs float32 on the CPU
    python benchmarks/precision_deviation.py --dtypes bfloat16,float16 --large
    python benchmarks/precision_deviation.py --device cuda --dtypes float16,bfloat16 --large
    python benchmarks/precision_deviation.py --image-size 112                 # seconds (dry run)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from anomalyclip import AnomalyCLIP, vision  # noqa: E402
from anomalyclip.runtime import resolve_precision  # noqa: E402
from anomalyclip.vision import set_float8  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden"
LAYERS = {"top": (24,), "multi": (6, 12, 18, 24)}


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def _outputs(model: AnomalyCLIP, pixel_values: torch.Tensor, dtype: torch.dtype | str, device: torch.device) -> dict:
    """Outputs for both layer variants with the CLIP in ``dtype`` (also ``"float8"``: CUDA 8.9+)."""
    torch_dtype, use_float8 = resolve_precision(dtype, device) if isinstance(dtype, str) else (dtype, False)
    model.to(device=device, dtype=torch_dtype)
    set_float8(model.clip.visual, use_float8)
    result = {}
    with torch.inference_mode():
        for variant, layers in LAYERS.items():
            model.reconfigure(feature_layers=layers)
            result[variant] = model(pixel_values)
    model.reconfigure(feature_layers=(24,))
    return result


def compare(reference: dict, other: dict, label: str) -> None:
    for variant in LAYERS:
        a, b = reference[variant], other[variant]
        print(
            f"  {label:<28} {variant:<5}  score {_max_abs(a.scores, b.scores):.2e}   "
            f"anomaly map {_max_abs(a.anomaly_maps, b.anomaly_maps):.2e}   "
            f"image feature {_max_abs(a.image_features, b.image_features):.2e}"
        )


def golden_comparison(dtypes: list[str], device: torch.device, image_size: int = 518) -> None:
    model = AnomalyCLIP.from_official_checkpoint(
        GOLDEN / "official_prompt_learner.pth", clip=f"local-dir:{GOLDEN / 'tiny-clip'}", device="cpu",
        image_size=image_size,
    )
    images = [GOLDEN / "image_a.png", GOLDEN / "image_b.png"]
    pixel_values = model.preprocess(images)
    reference = _outputs(model, pixel_values, torch.float32, device)
    golden = load_file(str(GOLDEN / "expected.safetensors"))
    print(f"golden tiny CLIP (image_a, image_b; S = {model.config.image_size}; device {device}); max |difference|:")
    for variant in LAYERS if image_size == 518 else ():
        out = reference[variant]
        score = max(_max_abs(out.scores[i : i + 1], golden[f"{n}.{variant}.score"]) for i, n in enumerate("ab"))
        amap = max(_max_abs(out.anomaly_maps[i : i + 1], golden[f"{n}.{variant}.anomaly_map"]) for i, n in enumerate("ab"))
        print(f"  {'float32 vs official golden':<28} {variant:<5}  score {score:.2e}   anomaly map {amap:.2e}")
    for name in dtypes:
        compare(reference, _outputs(model, pixel_values, name, device), f"{name} vs float32")


def large_comparison(dtypes: list[str], device: torch.device, batch: int) -> None:
    from bench_inference import build_vit_l_clip  # benchmarks/ is on sys.path when run as a script

    clip = build_vit_l_clip(device)
    model = AnomalyCLIP.from_clip(clip, backbone="ViT-L-14-336 (random)", image_size=518, seed=0)
    pixel_values = torch.randn(batch, 3, 518, 518, generator=torch.Generator().manual_seed(0))
    reference = _outputs(model, pixel_values, torch.float32, device)
    print(f"ViT-L-14-336 with random weights ({batch} random image{'s' if batch != 1 else ''}, S = 518; device {device}); max |difference|:")
    for name in dtypes:
        compare(reference, _outputs(model, pixel_values, name, device), f"{name} vs float32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16, float16, float8 (CUDA 8.9+) (default bfloat16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--large", action="store_true", help="also compare on a random ViT-L-14-336 at S = 518")
    parser.add_argument("--large-batch", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=518, help="size S for the golden images (default 518)")
    parser.add_argument("--cpu-low-precision-matmul", default=None, choices=["auto", "native", "float32"],
                        help="anomalyclip.vision.set_cpu_low_precision_matmul policy (default: auto)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cpu_low_precision_matmul is not None:
        vision.set_cpu_low_precision_matmul(args.cpu_low_precision_matmul)
    device = torch.device(args.device)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    print(f"torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"CPU low-precision matmul {vision.get_cpu_low_precision_matmul()!r}")
    golden_comparison(dtypes, device, args.image_size)
    if args.large:
        large_comparison(dtypes, device, args.large_batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
