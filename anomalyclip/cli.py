"""The ``anomalyclip`` command line: predict, calibrate, evaluate, finetune, convert, fetch, export, serve.

Run ``anomalyclip COMMAND --help`` for the options of each command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from ._version import __version__
from .data.datasets import FORMATS
from .errors import AnomalyCLIPError, InvalidInputError, MissingDependencyError
from .predict_io import collect_images, model_options

__all__ = ["main", "build_parser"]

logger = logging.getLogger("anomalyclip.cli")


def _add_model_options(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument(
        "--model",
        default=None,
        required=required,
        help="model directory, Hub repo id or preset (default: official-visa, the official prompts trained on VisA)",
    )
    p.add_argument("--device", default=None, help="cuda, cpu, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="compute dtype (default float32)")
    p.add_argument("--image-size", type=int, default=None, help="processing size S (default: the model's, 518)")
    p.add_argument("--feature-layers", type=int, nargs="+", default=None, help="output layers, e.g. 6 12 18 24")
    p.add_argument("--dpam-layers", type=int, default=None, help="final vision blocks with DPAM (default: the model's, 19 of 24)")
    p.add_argument("--dpam-mode", default=None, choices=("vv", "qq", "kk"), help="DPAM attention (default: the model's, vv)")
    p.add_argument("--sigma", type=float, default=None, help="Gaussian blur of the map in pixels (default: the model's, 4)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face / preset cache directory")


def _add_read_options(p: argparse.ArgumentParser) -> None:
    """How image files are read (:class:`anomalyclip.ImageReadOptions`; docs/cli.md, "Image files")."""
    g = p.add_argument_group("reading image files")
    g.add_argument(
        "--bit-depth", type=int, default=None, metavar="N",
        help="significant bits of 16-bit samples, e.g. 12 for Mono12 (default: the container's full range)",
    )
    g.add_argument(
        "--intensity-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
        help="window for 16-bit, 32-bit and float images: (x - LO) / (HI - LO), clipped to [0, 1]",
    )
    g.add_argument(
        "--no-exif-transpose", action="store_true", help="ignore EXIF orientation (default: apply it, as viewers do)"
    )
    g.add_argument(
        "--max-image-pixels", type=int, default=None, metavar="N",
        help="refuse larger images (default: Pillow's decompression-bomb limit, about 179 M pixels; 0: no limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalyclip",
        description="AnomalyCLIP: zero-shot anomaly detection and segmentation with CLIP.",
    )
    parser.add_argument("--version", action="version", version=f"anomalyclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="score images and write heat-map overlays")
    p.add_argument("inputs", nargs="+", help="image files or directories (searched recursively)")
    _add_model_options(p)
    p.add_argument("--out", default="anomalyclip-out", help="output directory (default: anomalyclip-out)")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="image-score threshold in [0, 1]: adds a label column (default: the model's saved thresholds, if any)",
    )
    p.add_argument(
        "--pixel-threshold",
        type=float,
        default=None,
        help="map threshold, on the map's scale [0, number of feature layers]: outlines the mask on overlays "
        "(default: the model's saved thresholds, if any)",
    )
    p.add_argument("--no-thresholds", action="store_true", help="ignore the thresholds saved with the model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity in the overlays")
    p.add_argument(
        "--references",
        nargs="+",
        default=None,
        metavar="DIR_OR_FILE",
        help="normal reference images or folders (few-shot: fused with the zero-shot map, see docs/fewshot.md)",
    )
    p.add_argument(
        "--coreset", type=float, default=None, help="keep this fraction of the reference patches (greedy coreset, e.g. 0.1)"
    )
    p.add_argument(
        "--tile-size", type=int, default=None, help="cut images larger than this many pixels into tiles (docs/tiling.md)"
    )
    p.add_argument(
        "--tile-overlap", type=float, default=None, help="overlap fraction of the tiles (default 0.25; only with --tile-size)"
    )
    _add_read_options(p)
    run = p.add_argument_group("outputs and failures (single process)")
    run.add_argument(
        "--resume", action="store_true",
        help="skip the images already in OUT/scores.csv (same options) and append the rest; error rows are retried",
    )
    run.add_argument(
        "--strict", action="store_true",
        help="stop at the first image that cannot be read or scored (exit status 2); default: an error row, go on, exit 1",
    )
    run.add_argument("--no-overlays", action="store_true", help="write no heat-map overlays (scores only)")
    run.add_argument(
        "--save-maps", default=None, choices=("npy", "png16"),
        help="also write each raw map to OUT/maps/: npy (float32) or png16 (16-bit PNG scaled by the map range, see run.json)",
    )
    run.add_argument("--save-masks", action="store_true", help="write each pixel-threshold mask to OUT/masks/ (needs a pixel threshold)")
    run.add_argument(
        "--num-workers", type=int, default=None,
        help="threads decoding and resizing the next images (default: 2 on the CPU, up to 8 on a GPU)",
    )
    run.add_argument("--output-workers", type=int, default=2, help="threads encoding overlays and maps (default 2; 0: inline)")
    ray = p.add_argument_group("scale-out on a Ray cluster (pip install \"anomalyclip[ray]\")")
    ray.add_argument("--ray", action="store_true", help="score on Ray actors; also writes scores.parquet")
    ray.add_argument("--ray-address", default=None, help="cluster to join (default: start a local Ray on this machine)")
    ray.add_argument("--workers", type=int, default=None, help="model actors (default: fill the cluster)")
    ray.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per actor (default 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per actor, e.g. 1 (default 0)")
    p.set_defaults(handler=_predict)

    p = sub.add_parser(
        "calibrate", help="build an inspection profile: prompts, references and thresholds from normal images"
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGES", help="normal images or folders (searched recursively)")
    _add_model_options(p)
    p.add_argument("--out", required=True, metavar="PROFILE", help="directory to save the profile in (from_pretrained(PROFILE))")
    p.add_argument("--quantile", type=float, default=0.99, help="quantile of the normal scores and map values (default 0.99)")
    p.add_argument(
        "--references", nargs="+", default=None, metavar="DIR_OR_FILE",
        help="normal reference images or folders, added before calibrating (few-shot, saved in the profile)",
    )
    p.add_argument("--coreset", type=float, default=None, help="keep this fraction of the reference patches (greedy coreset)")
    p.add_argument("--tile-size", type=int, default=None, help="calibrate for tiled prediction with tiles of this many pixels")
    p.add_argument("--tile-overlap", type=float, default=None, help="overlap fraction of the tiles (default 0.25; only with --tile-size)")
    p.add_argument("--batch-size", type=int, default=8)
    _add_read_options(p)
    p.set_defaults(handler=_calibrate)

    p = sub.add_parser("evaluate", help="metrics on a benchmark data set, as the paper reports them")
    _add_model_options(p)
    p.add_argument("--data", required=True, help="data set root")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="directory for metrics.json and metrics.csv")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--classes", nargs="+", default=None, help="evaluate only these classes")
    p.add_argument("--split", default="test", help="split to read (mvtec, visa, meta; default test)")
    p.add_argument(
        "--no-masks",
        action="store_true",
        help="allow anomalous images without masks (image-level metrics only for their classes)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="data-loading worker processes (default: 0 on the CPU, up to 8 on a GPU)",
    )
    p.add_argument(
        "--shots",
        type=int,
        default=None,
        help="few-shot protocol: per class, K normal training images drawn with --seed become the references",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw (default 0)")
    p.add_argument(
        "--report",
        action="store_true",
        help='also write report.html: curves, score histograms, worst cases (pip install "anomalyclip[report]"); '
        "with --shots, a zero-shot run beside the few-shot one",
    )
    p.set_defaults(handler=_evaluate)

    p = sub.add_parser("finetune", help="learn prompts on auxiliary data (the paper's glocal training)")
    p.add_argument("--data", required=True, help="auxiliary data set root")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument(
        "--out",
        required=True,
        help="output directory: epoch_K/ per epoch, the latest prompts at its root (from_pretrained(OUT))",
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument("--clip", default=None, help="start from fresh prompts on this open_clip backbone (paper setting)")
    start.add_argument("--model", default=None, help="continue from existing prompts (directory, Hub id or preset)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=None, help="training size S (default 518)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--feature-layers", type=int, nargs="+", default=None)
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--split", default="test", help="split to read (mvtec, visa, meta; default test, as the paper)")
    p.add_argument(
        "--feature-cache",
        default="memory",
        choices=("memory", "disk", "none"),
        help="cache the frozen vision features after epoch 1 (default memory)",
    )
    p.add_argument("--feature-cache-dir", default=None, help="directory of the disk feature cache (--feature-cache disk)")
    p.add_argument("--cache-dtype", default=None, choices=("float32", "float16", "bfloat16"), help="feature cache dtype")
    p.add_argument("--resume", default=None, help="resume an interrupted run from its output directory")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default 0)")
    p.add_argument("--device", default=None, help="cuda, cpu, mps (default: best available)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache directory")
    p.set_defaults(handler=_finetune)

    p = sub.add_parser("convert", help="convert an official AnomalyCLIP .pth to the save_pretrained format")
    p.add_argument("checkpoint", help="official checkpoint, e.g. epoch_15.pth")
    p.add_argument("out_dir", help="output directory (config.json, model.safetensors, README.md model card)")
    p.add_argument("--clip", default=None, help="backbone the prompts were trained on (default: ViT-L/14@336)")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(handler=_convert)

    p = sub.add_parser("fetch", help="download (or install from a local file) an official preset checkpoint")
    p.add_argument("preset", help="official-visa or official-mvtec")
    p.add_argument("--file", default=None, help="install this local copy instead of downloading")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(handler=_fetch)

    p = sub.add_parser("export", help="export a model for deployment (one ONNX file, run without torch)")
    p.add_argument("--model", default=None, help="model directory, Hub repo id or preset (default: official-visa)")
    p.add_argument("--format", required=True, choices=("onnx",), help="export format (onnx)")
    p.add_argument("--out", required=True, help="the file to write, e.g. anomalyclip.onnx")
    p.add_argument("--image-size", type=int, default=None, help="processing size S, fixed in the file (default: the model's, 518)")
    p.add_argument("--feature-layers", type=int, nargs="+", default=None, help="output layers, e.g. 6 12 18 24")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="weights and compute (default float32; float16 for GPU providers)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--quantize", default=None, choices=("int8",), help="write onnxruntime's dynamic int8 quantization of the float32 export")
    p.add_argument(
        "--references",
        nargs="+",
        default=None,
        metavar="DIR_OR_FILE",
        help="normal reference images or folders, added to the model's own before export (few-shot, in the graph)",
    )
    p.add_argument("--coreset", type=float, default=None, help="keep this fraction of the reference patches (greedy coreset)")
    p.add_argument(
        "--threshold", type=float, default=None, help="image-score threshold stored in the file, instead of the model's (labels by default)"
    )
    p.add_argument(
        "--pixel-threshold", type=float, default=None, help="map threshold stored in the file, instead of the model's (masks by default)"
    )
    p.add_argument(
        "--no-thresholds", action="store_true", help="store none of the model's saved thresholds (only --threshold / --pixel-threshold)"
    )
    p.add_argument("--cache-dir", default=None, help="Hugging Face / preset cache directory")
    p.set_defaults(handler=_export)

    from .serve.cli import add_serve_parser  # argparse only: FastAPI loads when the command runs

    add_serve_parser(sub, _add_model_options)
    return parser


# ----------------------------------------------------------------------------- helpers
def _load_model(args: argparse.Namespace, *, uses_references: bool = True):
    """``from_pretrained`` with the command's model options. A profile whose references do not
    match ``--image-size`` / ``--feature-layers`` / ``--dpam-*`` fails here, once, naming the flags
    (not after a load-time warning that says the same in Python); ``uses_references=False`` for
    a command that replaces them (``evaluate --shots``)."""
    _require_torch()
    from .model import AnomalyCLIP

    source = logging.getLogger(AnomalyCLIP._warn_if_references_stale.__module__)
    only_once = _DropStaleReferenceWarnings()
    source.addFilter(only_once)
    try:
        model = AnomalyCLIP.from_pretrained(args.model, **model_options(args))
    finally:
        source.removeFilter(only_once)
    if uses_references and model.references is not None:
        model.references.check_compatible(**model._reference_settings())
    return model


def _require_torch() -> None:
    """A :class:`MissingDependencyError` saying what to install when torch, open_clip or tqdm is
    missing (the ONNX-only install of docs/deployment.md runs ``predict --model FILE.onnx`` only)."""
    missing = [name for name in ("torch", "open_clip", "tqdm") if _module_missing(name)]
    if missing:
        raise MissingDependencyError(
            f"This command runs the torch model and needs {', '.join(missing)}, not installed here: "
            "pip install anomalyclip (with its dependencies). Without torch, run an ONNX export: "
            "anomalyclip predict IMAGES --model anomalyclip.onnx (docs/deployment.md)."
        )


def _module_missing(name: str) -> bool:
    import importlib.util

    if name in sys.modules:  # imported already, or blocked (None)
        return sys.modules[name] is None
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


class _DropStaleReferenceWarnings(logging.Filter):
    """Drops the model's "references do not match" warning: the CLI raises that error itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "anomalyclip_stale_references", False)


# ----------------------------------------------------------------------------- commands
def check_predict_options(args: argparse.Namespace) -> None:
    """Refuse options that would do nothing (before any model loads); the pixel threshold is
    checked against the model's map range once it is loaded."""
    if args.threshold is not None and not (0.0 <= args.threshold <= 1.0):
        raise InvalidInputError(
            f"--threshold {args.threshold:g} is outside the score range [0, 1]: image scores are probabilities "
            "(e.g. --threshold 0.5)."
        )
    check_paired_options(args)


def check_paired_options(args: argparse.Namespace) -> None:
    """Refuse ``--tile-overlap`` without ``--tile-size`` and ``--coreset`` without ``--references``
    (predict and calibrate): options that would do nothing."""
    if args.tile_overlap is not None and args.tile_size is None:
        raise InvalidInputError("--tile-overlap applies to tiles; add --tile-size PIXELS or drop --tile-overlap.")
    if args.coreset is not None and not args.references:
        raise InvalidInputError("--coreset applies to --references; add --references DIR or drop --coreset.")


def _add_references(model: Any, args: argparse.Namespace) -> None:
    """``--references DIR ... [--coreset F]`` with the run's tiling (predict and calibrate)."""
    references = collect_images(args.references)
    model.add_references(
        references,
        batch_size=args.batch_size,
        tile_size=args.tile_size,
        tile_overlap=0.25 if args.tile_overlap is None else args.tile_overlap,
        coreset=args.coreset,
        progress=not args.quiet,
    )
    logger.info("Added %d reference image(s)", len(references))


def _predict(args: argparse.Namespace) -> int:
    check_predict_options(args)
    if _is_onnx_file(args.model) and args.ray:
        raise InvalidInputError("--ray runs torch models; score an ONNX export without --ray, or pass a model directory.")
    if args.ray:
        from .distributed.cli import predict_with_ray

        single_only = ("resume", "strict", "no_overlays", "save_maps", "save_masks", "num_workers")
        given = [n for n in single_only if getattr(args, n) not in (None, False)] + (["output_workers"] if args.output_workers != 2 else [])
        if given:
            raise InvalidInputError(
                f"{', '.join('--' + n.replace('_', '-') for n in given)} apply to the single-process run, not --ray."
            )

        return predict_with_ray(args)
    ray_only = ("ray_address", "workers", "cpus_per_worker", "gpus_per_worker")
    if any(getattr(args, name) is not None for name in ray_only):
        raise InvalidInputError(f"{', '.join('--' + n.replace('_', '-') for n in ray_only)} need --ray.")
    from .predict_run import check_predict_args, run_predict

    check_predict_args(args)
    if _is_onnx_file(args.model):
        return _predict_onnx(args)
    images = collect_images(args.inputs)
    model = _load_model(args)
    if args.pixel_threshold is not None and not model.map_range[0] <= args.pixel_threshold <= model.map_range[1]:
        lo, hi = model.map_range
        raise InvalidInputError(
            f"--pixel-threshold {args.pixel_threshold:g} is outside this model's map range [{lo:g}, {hi:g}]: no pixel "
            "could be flagged or every pixel would be."
        )
    if args.references:
        _add_references(model, args)
    return run_predict(args, model, images)


def _calibrate(args: argparse.Namespace) -> int:
    from .predict_io import read_options

    check_paired_options(args)
    reading = read_options(args)
    images = collect_images(args.inputs)
    model = _load_model(args)
    if args.references:
        _add_references(model, args)
    thresholds = model.calibrate(
        images,
        quantile=args.quantile,
        batch_size=args.batch_size,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        read_options=reading,
    )
    out = model.save_pretrained(args.out)
    logger.info(
        "Calibrated on %d normal image(s) (quantile %s): image threshold %.6f, pixel threshold %.6f; profile saved to %s",
        len(images), args.quantile, thresholds.image, thresholds.pixel, out,
    )
    return 0


def _is_onnx_file(model: str | None) -> bool:
    return model is not None and model.lower().endswith(".onnx")


#: ``predict`` options that an ONNX export fixed when it was written (flag -> how to change it).
_FIXED_IN_EXPORT = {
    "image_size": "--image-size",
    "feature_layers": "--feature-layers",
    "dpam_layers": "--dpam-layers",
    "dpam_mode": "--dpam-mode",
    "sigma": "--sigma",
    "references": "--references",
    "coreset": "--coreset",
}


def _predict_onnx(args: argparse.Namespace) -> int:
    """``predict --model FILE.onnx``: the export run by onnxruntime, without torch (same files)."""
    from .onnx.runtime import OnnxAnomalyCLIP
    from .predict_run import run_predict

    fixed = [flag for name, flag in _FIXED_IN_EXPORT.items() if getattr(args, name) is not None]
    if fixed:
        raise InvalidInputError(
            f"{', '.join(fixed)} cannot change an ONNX export: the file fixes them. Export again with them "
            f"(anomalyclip export ... {' '.join(fixed)}), or pass a model directory / Hub id instead of '{args.model}'."
        )
    unsupported = [flag for flag, value in (("--tile-size", args.tile_size), ("--dtype", args.dtype), ("--cache-dir", args.cache_dir)) if value is not None]
    if unsupported:
        raise InvalidInputError(
            f"{', '.join(unsupported)} do not apply to an ONNX export (the runtime scores whole images in the "
            "file's dtype); drop them, or pass a model directory / Hub id."
        )
    images = collect_images(args.inputs)
    providers = {None: None, "cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    if args.device not in providers:
        raise InvalidInputError(f"--device {args.device}: an ONNX export runs on cpu or cuda (onnxruntime's providers).")
    model = OnnxAnomalyCLIP(args.model, providers=providers[args.device])
    logger.info("Scoring with %s (onnxruntime: %s)", args.model, ", ".join(model.providers))
    return run_predict(args, model, images)


def _evaluate(args: argparse.Namespace) -> int:
    from .data.datasets import load_dataset
    from .eval.protocol import evaluate, format_table, write_reports

    dataset = load_dataset(args.data, args.format, split=args.split, require_masks=not args.no_masks)
    if args.classes:
        dataset = dataset.subset(args.classes)
    if args.report:
        from .eval.plots import require_matplotlib

        require_matplotlib()  # before the run, not after it
    model = _load_model(args, uses_references=args.shots is None)
    report = evaluate(
        model,
        dataset,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=not args.quiet,
        shots=args.shots,
        seed=args.seed,
        details=args.report,
    )
    zero_shot = None
    if args.report and args.shots:  # the page shows zero-shot beside few-shot
        zero_shot = evaluate(
            model, dataset, batch_size=args.batch_size, num_workers=args.num_workers, progress=not args.quiet, shots=0, details=True
        )
    from .presets import DEFAULT_PRESET

    for run in (report, zero_shot):
        if run is not None:
            run.settings["model"] = args.model or DEFAULT_PRESET
    write_reports(report, args.out, html=args.report, compare=zero_shot)
    print(format_table(report))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .data.datasets import load_dataset
    from .model import AnomalyCLIP
    from .train.checkpoints import check_output_dir

    # Refuse an output folder of another run before minutes of loading the backbone.
    check_output_dir(Path(args.out).expanduser(), Path(args.resume).expanduser() if args.resume else None)
    dataset = load_dataset(args.data, args.format, split=args.split)
    if args.model is not None:
        model = AnomalyCLIP.from_pretrained(
            args.model,
            device=args.device,
            image_size=args.image_size,
            feature_layers=args.feature_layers,
            cache_dir=args.cache_dir,
        )
    else:
        from .config import DEFAULT_BACKBONE

        model = AnomalyCLIP.from_backbone(
            args.clip or DEFAULT_BACKBONE,
            device=args.device,
            image_size=args.image_size,
            feature_layers=args.feature_layers,
            cache_dir=args.cache_dir,
            seed=args.seed,
        )
    model.finetune(
        dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        output_dir=args.out,
        resume_from=args.resume,
        feature_cache=None if args.feature_cache == "none" else args.feature_cache,
        cache_dtype=args.cache_dtype,
        cache_dir=args.feature_cache_dir,
        num_workers=args.num_workers,
        progress=not args.quiet,
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .config import DEFAULT_BACKBONE
    from .model import AnomalyCLIP

    model = AnomalyCLIP.from_official_checkpoint(
        args.checkpoint, clip=args.clip or DEFAULT_BACKBONE, device="cpu", cache_dir=args.cache_dir
    )
    out = model.save_pretrained(args.out_dir)
    logger.info("Wrote %s (config.json, model.safetensors, README.md); load it with AnomalyCLIP.from_pretrained", out)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from .presets import fetch_official_checkpoint

    path = fetch_official_checkpoint(args.preset, source=args.file, cache_dir=args.cache_dir)
    logger.info("Preset %s verified and cached at %s", args.preset, path)
    return 0


def _export(args: argparse.Namespace) -> int:
    import tempfile

    from .errors import InvalidInputError
    from .model import AnomalyCLIP

    if args.quantize and args.dtype != "float32":
        raise InvalidInputError("--quantize int8 starts from a float32 export; drop --dtype float16.")
    if args.coreset is not None and not args.references:
        raise InvalidInputError("--coreset applies to --references; add --references DIR.")
    model = AnomalyCLIP.from_pretrained(args.model, device="cpu", cache_dir=args.cache_dir)
    if args.references:
        _add_export_references(model, args)
    options = dict(
        image_size=args.image_size,
        feature_layers=args.feature_layers,
        dtype=args.dtype,
        opset=args.opset,
        thresholds=False if args.no_thresholds else None,  # None: the model's own
        image_threshold=args.threshold,
        pixel_threshold=args.pixel_threshold,
        progress=not args.quiet,
    )
    out = Path(args.out)
    if args.quantize:
        from .onnx.quantize import quantize_int8

        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".anomalyclip-export-", dir=out.parent) as tmp:
            float_file = model.export_onnx(Path(tmp) / "float32.onnx", **options)
            quantize_int8(float_file, out)
    else:
        model.export_onnx(out, **options)
    logger.info("Wrote %s; run it with anomalyclip.onnx.OnnxAnomalyCLIP(%r).predict(images)", out, str(out))
    return 0


def _add_export_references(model: Any, args: argparse.Namespace) -> None:
    """``export --references``: add them at the export's settings, to the model's own if it has any."""
    settings = {"image_size": args.image_size, "feature_layers": args.feature_layers}
    settings = {k: v for k, v in settings.items() if v is not None}
    own = model.references
    if settings and own is not None:
        found = own.mismatches(
            image_size=settings.get("image_size", model.config.image_size),
            feature_layers=settings.get("feature_layers", model.config.feature_layers),
        )
        if found:
            raise InvalidInputError(
                "--references adds to the model's own references, taken with "
                + " and ".join(f"{name} {ours}" for name, ours, _ in found)
                + "; drop --image-size / --feature-layers (or export a model without references)."
            )
    had_thresholds = model.thresholds is not None
    if settings:
        model.reconfigure(**settings)  # references are taken at the settings the export runs with
    model.add_references(collect_images(args.references), coreset=args.coreset, progress=not args.quiet)
    if had_thresholds and args.threshold is None and args.pixel_threshold is None and not args.no_thresholds:
        logger.warning(
            "The model's saved thresholds do not hold with the added references; the file stores none. Pass "
            "--threshold / --pixel-threshold chosen for the fused outputs to store some."
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anomalyclip`` command. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # Our messages at `level`; other libraries (open_clip logs at INFO on the root logger) only
    # at WARNING unless --verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("anomalyclip").setLevel(level)
    try:
        return args.handler(args)
    except AnomalyCLIPError as exc:  # the message that names the command's flags, printed once
        print(f"anomalyclip {args.command}: error: {exc.message_for('cli')}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a dependency of the torch commands, on an ONNX-only install
        print(
            f"anomalyclip {args.command}: error: needs the Python package '{exc.name}', which is not installed: "
            "pip install anomalyclip (with its dependencies); an ONNX-only install runs "
            "`anomalyclip predict IMAGES --model FILE.onnx` only.",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"anomalyclip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
