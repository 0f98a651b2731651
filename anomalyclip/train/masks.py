"""Ground-truth masks for training: read and checked once, before the first epoch, and held in
memory as packed bits (S*S/8 bytes per anomalous image)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from ..config import AnomalyCLIPConfig
from ..data.reader import SampleReader
from ..errors import DatasetError
from ..files import list_paths

__all__ = ["MaskStore", "load_masks"]

logger = logging.getLogger(__name__)


class MaskStore:
    """Preprocessed ground-truth masks at the processing size, packed 8 pixels per byte.

    Only anomalous samples are stored; normal images have all-zero masks (a mask file of a normal
    sample is ignored, as :class:`anomalyclip.data.reader.SampleReader` does).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._packed: dict[int, np.ndarray] = {}

    def put(self, index: int, mask: torch.Tensor) -> None:
        """Store ``mask [S, S]`` (anything > 0.5 is anomalous)."""
        self._packed[index] = np.packbits((mask > 0.5).numpy().reshape(-1))

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """``[len(indices), S, S]`` bool masks."""
        s = self.size
        out = np.zeros((len(indices), s, s), dtype=bool)
        for row, index in enumerate(indices):
            packed = self._packed.get(index)
            if packed is not None:
                out[row] = np.unpackbits(packed, count=s * s).reshape(s, s).astype(bool)
        return torch.from_numpy(out)

    def __len__(self) -> int:
        return len(self._packed)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._packed.values())


def load_masks(samples: Sequence[Any], config: AnomalyCLIPConfig, *, num_workers: int, progress: bool) -> MaskStore:
    """Preprocess the mask of every anomalous sample once, at ``config.image_size``.

    Masks are read by :class:`~anomalyclip.data.reader.SampleReader` (masks only: each is checked
    against its image's size, read from the image header).

    Raises:
        DatasetError: a mask of another size than its image, or no anomalous pixel in any mask
            (an empty mask alone is only a warning).
        ImageLoadError: an unreadable image or mask.
    """
    from tqdm.auto import tqdm

    size = config.image_size
    store = MaskStore(size)
    indices = [i for i, s in enumerate(samples) if s.label == 1]
    reader = SampleReader.for_config(samples, config, images=False)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(reader, indices), batch_size=16, num_workers=num_workers
    )
    empty: list[Any] = []
    total = 0
    with tqdm(total=len(indices), desc="masks", unit="mask", disable=not progress, leave=False) as bar:
        for batch in loader:
            for index, mask in zip(batch["index"].tolist(), batch["mask"]):
                store.put(index, mask)
                pixels = int((mask > 0.5).sum())
                total += pixels
                if pixels == 0:
                    empty.append(samples[index].mask_path)
            bar.update(len(batch["index"]))
    if total == 0:
        raise DatasetError(
            f"None of the {len(indices)} masks has an anomalous pixel at {size}x{size} px; the local loss "
            "needs defect masks (non-zero pixels mark anomalies). Check the mask files."
        )
    if empty:
        logger.warning(
            "%d anomalous image(s) have an empty mask at %dx%d px (they count as defect-free pixels): %s",
            len(empty),
            size,
            size,
            list_paths(empty),
        )
    return store
