"""Model cards: the ``README.md`` that ``save_pretrained`` and ``push_to_hub`` write beside a model.

The card is built with :class:`huggingface_hub.ModelCard` / :class:`~huggingface_hub.ModelCardData`
from the model's config alone: the backbone (``base_model``), the licence, what the prompts were
trained on when known, the inference options and the saved thresholds. A card this library wrote
carries :data:`CARD_MARKER`; a ``README.md`` without it was written by someone else and is never
overwritten.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .config import DEFAULT_BACKBONE, AnomalyCLIPConfig
from .files import atomic_write

__all__ = ["MODEL_CARD_NAME", "CARD_MARKER", "base_model_id", "build_model_card", "is_generated_card", "write_model_card"]

logger = logging.getLogger(__name__)

#: File name of the model card in a saved model / Hub repo.
MODEL_CARD_NAME = "README.md"
#: First line of the card body; its presence marks a card this library may regenerate.
CARD_MARKER = "<!-- anomalyclip:model-card (generated; delete this line to keep your edits when the model is saved again) -->"
_MARKER_PREFIX = "<!-- anomalyclip:model-card"

#: Licences of the data sets the official prompts were trained on.
DATASET_LICENCES = {"VisA": "CC BY 4.0", "MVTec AD": "CC BY-NC-SA 4.0 (non-commercial)"}
#: Licences of backbones whose terms this library knows; others: see the backbone's own card.
BACKBONE_LICENCES = {DEFAULT_BACKBONE: "MIT (OpenAI CLIP weights)"}

_CITATION = """@inproceedings{zhou2024anomalyclip,
  title={AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection},
  author={Zhou, Qihang and Pang, Guansong and Tian, Yu and He, Shibo and Chen, Jiming},
  booktitle={International Conference on Learning Representations},
  year={2024}
}"""


def base_model_id(backbone: str) -> str | None:
    """The Hub id of a backbone reference (``hf-hub:org/repo`` -> ``org/repo``); None for local ones."""
    if backbone.startswith("hf-hub:"):
        repo = backbone[len("hf-hub:") :].strip("/")
        return repo or None
    return None


def is_generated_card(text: str) -> bool:
    """Whether a ``README.md`` is a card this library wrote (and may therefore replace).

    True for cards carrying :data:`CARD_MARKER`, and for the placeholder card of anomalyclip 0.1's
    ``push_to_hub`` (``library_name: anomalyclip`` with the literal ``"<this repo>"``).
    """
    if _MARKER_PREFIX in text:
        return True
    return "library_name: anomalyclip" in text and '"<this repo>"' in text


def _prompt_parameters(config: AnomalyCLIPConfig) -> int:
    return config.text_width * (2 * config.n_ctx + config.n_deep_prompts * config.deep_prompt_length)


def _training_section(config: AnomalyCLIPConfig) -> str:
    training = config.extra.get("training") if isinstance(config.extra.get("training"), dict) else None
    lines = []
    if config.trained_on:
        lines.append(f"The prompts were trained on **{config.trained_on}**.")
        notes = [f"{name} is licensed {licence}" for name, licence in DATASET_LICENCES.items() if name in config.trained_on]
        if notes:
            lines.append(" ".join(f"{n};" for n in notes)[:-1] + ": check those terms before commercial use.")
    else:
        lines.append("What the prompts were trained on is not recorded in this model's config (`trained_on`).")
    if training:
        facts = [
            f"{key.replace('_', ' ')}: {training[key]}"
            for key in ("epochs", "num_images", "num_anomalous", "data_format", "lr", "batch_size", "seed")
            if training.get(key) is not None
        ]
        if facts:
            lines.append("Training run (`config.json` `extra.training`): " + ", ".join(facts) + ".")
    return "\n\n".join(lines)


def _thresholds_section(config: AnomalyCLIPConfig) -> str:
    n = len(config.feature_layers)
    scale = (
        f"Scores lie in [0, 1]. Map values lie in [0, {n}]: the official sum over the {n} output layer(s) "
        "of each layer's anomalous probability."
    )
    if config.thresholds is None:
        return (
            "None saved. Choose them from images known to be normal with `model.calibrate(normal_images)` "
            "(kept on the model and written to `config.json` by `save_pretrained`). " + scale
        )
    rows = [f"| {kind} | {value:.6g} |" for kind, value in config.thresholds.items() if value is not None]
    return (
        "Saved in `config.json` and applied by `predict` when no threshold is passed "
        "(`predict(..., thresholds=False)` ignores them). A value above its threshold is anomalous.\n\n"
        "| threshold | value |\n|---|---|\n" + "\n".join(rows) + "\n\n" + scale
    )


def build_model_card(config: AnomalyCLIPConfig, *, location: str) -> "ModelCard":  # noqa: F821
    """The model card of a model with ``config``, loadable from ``location`` (a repo id or a path).

    Returns:
        a :class:`huggingface_hub.ModelCard` (``str(card)`` is the ``README.md`` text).
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model_id(config.backbone)
    data = ModelCardData(
        library_name="anomalyclip",
        license="mit",
        base_model=base,
        tags=["anomalyclip", "anomaly-detection", "zero-shot", "clip", "image-segmentation"],
    )
    n = len(config.feature_layers)
    usage = [
        "from anomalyclip import AnomalyCLIP",
        "",
        f"model = AnomalyCLIP.from_pretrained({json.dumps(location)})",
        'result = model.predict("image.png")',
        f"result.score, result.anomaly_map   # score in [0, 1]; map [H, W] in [0, {n}]",
    ]
    if config.thresholds is not None:
        usage.append("result.label, result.mask          # from the saved thresholds")
    usage_text = "\n".join(usage)
    backbone_licence = BACKBONE_LICENCES.get(config.backbone, "its own licence (see the backbone's model card)")
    body = f"""{CARD_MARKER}

# AnomalyCLIP prompts

Learned object-agnostic prompts ({_prompt_parameters(config):,} parameters) for zero-shot anomaly
detection and segmentation with [AnomalyCLIP](https://arxiv.org/abs/2310.18961) (Zhou et al., ICLR
2024) on the frozen CLIP backbone `{config.backbone}`, for the
[anomalyclip](https://pypi.org/project/anomalyclip/) library. The model is the prompts
(`model.safetensors`) and their `config.json`; the library loads the backbone from its own reference.

## Usage

```python
{usage_text}
```

## Settings

| option | value |
|---|---|
| backbone | `{config.backbone}` |
| image_size | {config.image_size} |
| feature_layers | {list(config.feature_layers)} |
| dpam_layers, dpam_mode | {config.dpam_layers}, `{config.dpam_mode}` |
| sigma | {config.sigma:g} |
| quick_gelu | {config.quick_gelu} |

## Training data

{_training_section(config)}

## Thresholds

{_thresholds_section(config)}

## Licence

The prompts and the anomalyclip library: MIT (change the `license` field if your prompts come under
other terms). The backbone `{config.backbone}` comes under {backbone_licence}. The data sets named
above keep their own licences.

## Citation

```bibtex
{_CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(directory: str | os.PathLike, config: AnomalyCLIPConfig, *, location: str) -> Path | None:
    """Write the card to ``directory/README.md`` unless a README someone else wrote is there.

    Returns:
        the card's path, or None when an existing user README was kept.
    """
    path = Path(directory) / MODEL_CARD_NAME
    if path.exists():
        try:
            existing = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            existing = ""
        if not is_generated_card(existing):
            logger.info("Keeping %s: it was not written by anomalyclip (no model-card marker).", path)
            return None
    with atomic_write(path, "w") as handle:
        handle.write(str(build_model_card(config, location=location)))
    return path
