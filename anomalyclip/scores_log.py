"""``scores.csv`` as a log that never loses a result: one row appended (and flushed) per finished
image, the header written once, resumable; ``scores.json`` (and ``scores.parquet`` when pyarrow
is installed) written from it at the end, atomically.

Torch-free; used by ``anomalyclip predict`` (:mod:`anomalyclip.predict_run`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

from .errors import InvalidInputError
from .files import atomic_path, atomic_write

__all__ = ["ScoresLog", "read_rows", "typed_row", "write_summaries", "RUN_FILE"]

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
"""The options a ``scores.csv`` was written with (beside it): ``--resume`` refuses other options."""

_FLOAT_COLUMNS = ("score", "anomalous_fraction")
_INT_COLUMNS = ("label",)


def read_rows(path: str | os.PathLike) -> tuple[list[str] | None, list[dict[str, str]]]:
    """``(header, rows)`` of a ``scores.csv``, its complete lines only (a line cut by a killed run
    is dropped). ``(None, [])`` when the file is missing or empty."""
    path = Path(path)
    if not path.is_file():
        return None, []
    with open(path, encoding="utf-8", newline="") as handle:
        text = handle.read()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # the last line was cut mid-write
    lines = list(csv.reader(text.splitlines(keepends=True)))
    if not lines:
        return None, []
    header, body = lines[0], lines[1:]
    rows = [dict(zip(header, line)) for line in body if len(line) == len(header)]
    return header, rows


def typed_row(row: Mapping[str, str]) -> dict[str, Any]:
    """A CSV row with its values typed as in ``scores.json``: floats, ints (``label`` 0/1), None for empty."""
    typed: dict[str, Any] = {}
    for key, value in row.items():
        if value == "":
            typed[key] = None
        elif key in _FLOAT_COLUMNS:
            typed[key] = float(value)
        elif key in _INT_COLUMNS:
            typed[key] = int(value in ("True", "true", "1"))
        else:
            typed[key] = value
    return typed


class ScoresLog:
    """Append-only ``scores.csv`` with a fixed header.

    Args:
        path: the CSV file.
        columns: its header; every row gives these keys (missing ones written empty).
        options: the run's options, written to ``run.json`` beside the file and compared on resume.
        resume: keep the rows of an existing file with the same header and options (rows with an
            ``error`` are dropped, so those images are tried again); otherwise start a new file.

    Raises:
        InvalidInputError: ``resume`` and the existing file has other columns or options.
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], options: Mapping[str, Any], *, resume: bool) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.done: dict[str, dict[str, str]] = {}
        run_file = self.path.with_name(RUN_FILE)
        options = json.loads(json.dumps(dict(options)))  # as it reads back
        header, rows = read_rows(self.path) if resume else (None, [])
        if header is not None:
            old = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else None
            if header != self.columns or old != options:
                changed = sorted(k for k in set(options) | set(old or {}) if (old or {}).get(k) != options.get(k))
                raise InvalidInputError(
                    f"--resume: '{self.path}' was written by a run with other "
                    + (f"columns ({', '.join(header)} instead of {', '.join(self.columns)})" if header != self.columns else f"options ({', '.join(changed)})")
                    + "; resume with the same options, or write to another --out (or drop --resume to start over)."
                )
            self.done = {r["image"]: r for r in rows if not r.get("error")}
        with atomic_write(run_file, "w") as handle:
            handle.write(json.dumps(options, indent=2, sort_keys=True) + "\n")
        # Rewrite the kept rows (drops a cut last line and the error rows), then append.
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(self.done.values())
        self._handle: IO[str] | None = open(self.path, "a", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=self.columns, restval="")

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one row and flush it to the OS (a killed process keeps it)."""
        if self._handle is None:
            raise InvalidInputError("ScoresLog is closed.")
        self._writer.writerow({k: _cell(v) for k, v in row.items()})
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "ScoresLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else round(value, 6)
    if isinstance(value, str):
        return " ".join(value.split("\n"))  # one line per row: a cut row is recognised by its end
    return value


def write_summaries(out_dir: str | os.PathLike, order: Sequence[str] | None = None) -> list[Path]:
    """``scores.json`` (and ``scores.parquet`` when pyarrow is installed) from ``scores.csv``,
    atomically; rows sorted by ``order`` (image paths) when given. Returns the paths written."""
    out = Path(out_dir)
    _, rows = read_rows(out / "scores.csv")
    typed = [typed_row(r) for r in rows]
    if order is not None:
        rank = {str(p): i for i, p in enumerate(order)}
        typed.sort(key=lambda r: rank.get(r["image"], len(rank)))
    written = [out / "scores.json"]
    with atomic_write(written[0], "w") as handle:
        handle.write(json.dumps(typed, indent=2) + "\n")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        logger.debug("pyarrow is not installed: no scores.parquet")
        return written
    columns = list(rows[0]) if rows else []
    kinds = {c: pa.float64() if c in _FLOAT_COLUMNS else pa.int64() if c in _INT_COLUMNS else pa.string() for c in columns}
    schema = pa.schema([pa.field(c, kinds[c]) for c in columns])
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in typed], schema=schema)
    written.append(out / "scores.parquet")
    with atomic_path(written[1]) as tmp:
        pq.write_table(table, tmp)
    return written
