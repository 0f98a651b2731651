"""The optional inspection log: one SQLite row per answered prediction (``--store results.db``)."""

from __future__ import annotations

import datetime as _dt
import sqlite3
import threading
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..files import atomic_write

__all__ = ["ResultStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inspections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    name TEXT,
    score REAL NOT NULL,
    label INTEGER,
    image_threshold REAL,
    pixel_threshold REAL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    map_file TEXT
)
"""
_COLUMNS = ("id", "time", "name", "score", "label", "image_threshold", "pixel_threshold", "width", "height", "map_file")
_MAX_NAME = 256


class ResultStore:
    """An SQLite inspection log, safe to use from several threads.

    Args:
        path: the database file (created with its table when missing).
        keep_maps: also keep each map as a 16-bit PNG in the folder ``<path>.maps/``; the row
            records its file name (relative to that folder).
    """

    def __init__(self, path: str | Path, *, keep_maps: bool = False) -> None:
        self.path = Path(path)
        self.maps_dir = self.path.with_name(self.path.name + ".maps") if keep_maps else None
        if self.path.exists() and self.path.is_dir():
            raise InvalidInputError(f"--store '{self.path}' is a directory; give a file name such as results.db.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.maps_dir is not None:
            self.maps_dir.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        with self._lock, self._db:
            self._db.execute(_SCHEMA)

    def add(
        self,
        *,
        name: str | None,
        score: float,
        label: int | None,
        image_threshold: float | None,
        pixel_threshold: float | None,
        width: int,
        height: int,
        map_png: bytes | None = None,
    ) -> dict[str, Any]:
        """Record one inspection (now, UTC); the map PNG is kept when the store keeps maps. Returns the row."""
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        name = None if name is None else str(name)[:_MAX_NAME]
        with self._lock, self._db:
            cursor = self._db.execute(
                "INSERT INTO inspections (time, name, score, label, image_threshold, pixel_threshold, width, height) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (now, name, score, label, image_threshold, pixel_threshold, width, height),
            )
            row_id = int(cursor.lastrowid or 0)
            map_file = None
            if self.maps_dir is not None and map_png is not None:
                map_file = f"{row_id:08d}.png"  # our own name: nothing the client sent reaches a path
                with atomic_write(self.maps_dir / map_file, "wb") as handle:
                    handle.write(map_png)
                self._db.execute("UPDATE inspections SET map_file = ? WHERE id = ?", (map_file, row_id))
        return dict(zip(_COLUMNS, (row_id, now, name, score, label, image_threshold, pixel_threshold, width, height, map_file)))

    def page(self, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """``{"total", "limit", "offset", "results": [...]}``: newest first."""
        with self._lock:
            total = self._db.execute("SELECT COUNT(*) FROM inspections").fetchone()[0]
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM inspections ORDER BY id DESC LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return {"total": int(total), "limit": limit, "offset": offset, "results": [dict(zip(_COLUMNS, r)) for r in rows]}

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
