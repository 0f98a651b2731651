"""AnomalyCLIP: zero-shot anomaly detection and segmentation with CLIP and learned prompts.

Quick start::

    from anomalyclip import AnomalyCLIP
    model = AnomalyCLIP.from_pretrained()      # official prompts (trained on VisA)
    result = model.predict("image.png")        # result.score, result.anomaly_map
"""

__version__ = "0.1.0"

from .config import AnomalyCLIPConfig  # noqa: E402
from .datasets import AnomalyDataset, Sample, load_dataset  # noqa: E402
from .errors import (  # noqa: E402
    AnomalyCLIPError,
    BackboneError,
    CheckpointError,
    DatasetError,
    ImageLoadError,
    InvalidInputError,
    WeightsNotFoundError,
)
from .evaluation import evaluate  # noqa: E402
from .model import AnomalyCLIP  # noqa: E402
from .outputs import AnomalyOutput, AnomalyResult  # noqa: E402
from .presets import DEFAULT_PRESET, PRESETS  # noqa: E402

__all__ = [
    "__version__",
    "AnomalyCLIP",
    "AnomalyCLIPConfig",
    "evaluate",
    "load_dataset",
    "AnomalyDataset",
    "Sample",
    "AnomalyOutput",
    "AnomalyResult",
    "PRESETS",
    "DEFAULT_PRESET",
    "AnomalyCLIPError",
    "BackboneError",
    "CheckpointError",
    "DatasetError",
    "ImageLoadError",
    "InvalidInputError",
    "WeightsNotFoundError",
]
