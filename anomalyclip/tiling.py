"""High-resolution images: a grid of overlapping tiles and seamless blending of their maps.

An image larger than a tile is cut into overlapping tiles of ``tile_size`` pixels (smaller where
the image is smaller); each tile then runs through the model like any image (squashed to S x S),
and its map, resized back to the tile's pixel size, is blended into one map at the original size.

Blending: tile ``(i, j)`` (row ``i``, column ``j``) weighs its pixels by ``a_i(y) * b_j(x)``, 1-D
linear ramps that rise over the overlap with the previous tile and fall over the overlap with the
next one (no ramp on a side that touches the image border), strictly positive. The blended map
is ``sum_t w_t M_t / sum_t w_t``: a convex combination of the tile maps at every pixel, so
constant tile maps give exactly that constant and no seam can exceed the tiles' own values.
Because the weights are separable and the tiles form a grid, ``sum_t w_t = A(y) * B(x)`` with
``A = sum_i a_i`` and ``B = sum_j b_j``: the stitcher holds one float32 accumulator of the
original size (and two 1-D sums), never a full-size copy per tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from .errors import InvalidInputError
from .preprocessing import PreparedImage

__all__ = ["Tile", "TileGrid", "tile_grid", "axis_weights", "crop_prepared", "TileStitcher"]


@dataclass(frozen=True)
class Tile:
    """One tile: grid position (``row``, ``col``) and pixel box (``top``, ``left``, ``height``, ``width``)."""

    row: int
    col: int
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class TileGrid:
    """Tiles of an image of ``height x width`` pixels: tiles start at ``tops`` x ``lefts``."""

    height: int
    width: int
    tile_height: int
    tile_width: int
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    @property
    def tiles(self) -> list[Tile]:
        """Row-major list of the tiles."""
        return [
            Tile(i, j, top, left, self.tile_height, self.tile_width)
            for i, top in enumerate(self.tops)
            for j, left in enumerate(self.lefts)
        ]

    def __len__(self) -> int:
        return len(self.tops) * len(self.lefts)


def _starts(length: int, tile: int, overlap: float) -> tuple[int, ...]:
    """Tile starts along one axis: first 0, last ``length - tile``, evenly spread, each step at most
    ``tile * (1 - overlap)`` (so neighbours overlap by at least ``overlap`` of a tile)."""
    if length <= tile:
        return (0,)
    stride = max(1.0, tile * (1.0 - overlap))
    n = int(math.ceil((length - tile) / stride)) + 1
    return tuple(int(round(k * (length - tile) / (n - 1))) for k in range(n))


def tile_grid(height: int, width: int, tile_size: int, overlap: float = 0.25) -> TileGrid:
    """The tiles of an image of ``height x width`` pixels.

    Args:
        height, width: image size in pixels.
        tile_size: tile side in pixels; an image side not larger than it gets one tile of the
            image's own size along that axis (a tile as large as the image: one tile, the image).
        overlap: fraction of a tile that neighbours share at least, in ``[0, 1)``.
    """
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise InvalidInputError(f"tile_size must be a positive int (pixels), got {tile_size!r}.")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise InvalidInputError(f"tile_overlap must be a fraction in [0, 1), got {overlap!r}.")
    th, tw = min(tile_size, height), min(tile_size, width)
    return TileGrid(height, width, th, tw, _starts(height, th, overlap), _starts(width, tw, overlap))


def axis_weights(starts: tuple[int, ...], tile: int) -> list[torch.Tensor]:
    """1-D blending weights ``[tile]`` (float32) of each tile along one axis.

    Tile ``k`` ramps up linearly over its overlap ``o`` with tile ``k - 1`` (``(x + 0.5) / o``) and
    down over its overlap with tile ``k + 1``; elsewhere (and at the image borders) the weight is 1.
    Where two tiles overlap their weights sum to 1.
    """
    x = torch.arange(tile, dtype=torch.float64) + 0.5
    out = []
    for k, start in enumerate(starts):
        w = torch.ones(tile, dtype=torch.float64)
        if k > 0:
            o = starts[k - 1] + tile - start
            if o > 0:
                w = torch.minimum(w, x / o)
        if k + 1 < len(starts):
            o = start + tile - starts[k + 1]
            if o > 0:
                w = torch.minimum(w, (tile - x) / o)
        out.append(w.to(torch.float32))
    return out


def crop_prepared(prepared: PreparedImage, tile: Tile) -> PreparedImage:
    """The tile's pixels as a :class:`PreparedImage` (a PIL crop or an array view; no float copy)."""
    box = (tile.left, tile.top, tile.left + tile.width, tile.top + tile.height)
    if (box[0], box[1]) == (0, 0) and (tile.height, tile.width) == prepared.size:
        return prepared
    if prepared.pil is not None:
        return PreparedImage(pil=prepared.pil.crop(box), array=None)
    array = cast(np.ndarray, prepared.array)  # a PreparedImage holds exactly one of pil and array
    return PreparedImage(pil=None, array=array[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width])


class TileStitcher:
    """Blend tile maps into one ``[height, width]`` float32 map (see the module docstring)."""

    def __init__(self, grid: TileGrid) -> None:
        self.grid = grid
        self.row_weights = axis_weights(grid.tops, grid.tile_height)
        self.col_weights = axis_weights(grid.lefts, grid.tile_width)
        self._acc = torch.zeros(grid.height, grid.width, dtype=torch.float32)
        self._added = 0

    def add(self, tile: Tile, tile_map: torch.Tensor) -> None:
        """Accumulate one tile's map ``[tile.height, tile.width]`` (moved to the CPU as float32)."""
        if tuple(tile_map.shape) != (tile.height, tile.width):
            raise InvalidInputError(f"Tile map of shape {list(tile_map.shape)}, expected [{tile.height}, {tile.width}].")
        weighted = tile_map.detach().to("cpu", torch.float32) * self.row_weights[tile.row][:, None]
        weighted *= self.col_weights[tile.col][None, :]
        self._acc[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] += weighted
        self._added += 1

    def result(self) -> torch.Tensor:
        """The blended ``[height, width]`` float32 map (call once, after every tile was added)."""
        if self._added != len(self.grid):
            raise InvalidInputError(f"{self._added} of {len(self.grid)} tiles were added to the stitcher.")
        g = self.grid
        rows = torch.zeros(g.height, dtype=torch.float32)
        cols = torch.zeros(g.width, dtype=torch.float32)
        for top, w in zip(g.tops, self.row_weights):
            rows[top : top + g.tile_height] += w
        for left, w in zip(g.lefts, self.col_weights):
            cols[left : left + g.tile_width] += w
        out = self._acc
        out /= rows[:, None]
        out /= cols[None, :]
        return out
