"""A run's training log: one CSV file, appended row by row, with an optional TensorBoard mirror.

The CSV is what scripts read (:func:`read_log`); TensorBoard, when installed, shows the same numbers. The
header is written once. A resumed run keeps the rows up to the checkpoint's step and drops the ones a killed
run wrote after it, so a step never appears twice and the file reads as if the run had not stopped.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from metaham.atomic import atomic_write_bytes


class CsvLog:
    """Rows of ``fields`` in ``path`` (one of the fields is ``step``).

    Args:
        path: the CSV file.
        fields: its columns, in order.
        keep_through: ``None`` starts a fresh file; a step number (a resumed run) keeps the existing rows up to
            that step.
        tensorboard: a folder for the TensorBoard mirror (``None``: CSV only).
        tags: column -> TensorBoard tag of the numeric columns to mirror.
        formats: column -> format spec of its floats (default ``.8g``).
        enabled: ``False`` writes nothing (a process that is not the run's writer).
    """

    def __init__(
        self,
        path: str | Path,
        fields: Sequence[str],
        *,
        keep_through: int | None = None,
        tensorboard: str | Path | None = None,
        tags: Mapping[str, str] | None = None,
        formats: Mapping[str, str] | None = None,
        enabled: bool = True,
    ) -> None:
        self.path = Path(path)
        self.fields = tuple(fields)
        self._tags = dict(tags or {})
        self._formats = dict(formats or {})
        self._enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        kept = []
        if keep_through is not None and self.path.is_file():
            with self.path.open(newline="") as fh:
                kept = [row for row in csv.DictReader(fh) if int(row["step"]) <= keep_through]
        # Header and kept rows replace the file in one atomic write; rows are then appended one at a time.
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_bytes(self.path, text.getvalue().encode())
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fields, lineterminator="\n")
        if tensorboard is not None and self._tags:
            self._tb = _summary_writer(Path(tensorboard), keep_through)

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (missing columns and ``None`` are empty) and flush it to disk."""
        if self._file is None:
            return
        unknown = set(row) - set(self.fields)
        if unknown:
            raise KeyError(f"{self.path.name}: no column(s) {', '.join(sorted(unknown))}")
        self._writer.writerow({key: self._text(key, row.get(key)) for key in self.fields})
        self._file.flush()
        if self._tb is not None:
            for key, tag in self._tags.items():
                if row.get(key) is not None:
                    self._tb.add_scalar(tag, row[key], int(row["step"]))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "CsvLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _text(self, key: str, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return format(value, self._formats.get(key, ".8g"))
        return str(value)


def read_log(path: str | Path) -> list[dict[str, float | str | None]]:
    """The rows of a CSV log: numbers as floats, empty cells as ``None``, other text as it is."""
    with Path(path).open(newline="") as fh:
        return [{key: _value(text) for key, text in row.items()} for row in csv.DictReader(fh)]


def _value(text: str) -> float | str | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _summary_writer(log_dir: Path, keep_through: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; the CSV log is always written
        return None
    # purge_step drops the events a killed run logged after the checkpoint it resumes from.
    return SummaryWriter(str(log_dir), purge_step=keep_through or None)
