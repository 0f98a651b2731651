"""Score your own image with AnomalyCLIP and save a heat-map overlay next to it.

Usage:
    python examples/detect_and_overlay.py IMAGE [IMAGE ...] [--model official-visa] [--out DIR]

The first run downloads the CLIP backbone (1.7 GB, Hugging Face Hub) and the official prompts
(official repository, verified). Offline, pass ``--model`` a directory written by
``anomalyclip convert epoch_15.pth DIR`` or ``save_pretrained``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anomalyclip import AnomalyCLIP
from anomalyclip.visualize import save_overlay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", default=None, help="preset, directory or Hub repo id (default: official-visa)")
    parser.add_argument("--out", default="overlays", help="output directory")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    args = parser.parse_args()

    model = AnomalyCLIP.from_pretrained(args.model, device=args.device)
    results = model.predict(args.images, batch_size=4)
    out = Path(args.out)
    vmin, vmax = model.map_range  # maps lie in [0, number of output layers]
    for result in results:
        target = save_overlay(
            out / f"{Path(result.path).stem}_overlay.png", result.path, result.anomaly_map, vmin=vmin, vmax=vmax
        )
        print(f"{result.path}: anomaly score {result.score:.3f} -> {target}")


if __name__ == "__main__":
    main()
