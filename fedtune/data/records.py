"""Site records read from JSONL, and their validation.

One record is the privacy unit: one text, one prompt/response pair, one labelled text.
How a JSON object becomes a record is the reading task's (:mod:`fedtune.tasks`).  A record
that cannot be read is an error naming the file, the line and the fix, never a
silent skip, because a silently dropped record changes what δ means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence


class DataError(ValueError):
    """The data file is unusable; the message says where and how to fix it."""


@dataclass(frozen=True)
class Record:
    """One training record.  Loss is taken on ``response`` only; plain text has no prompt.

    A labelled record (classification) holds its text in ``response`` and its class index
    in ``label``.
    """

    prompt: str
    response: str
    group: Optional[str] = None
    label: Optional[int] = None


@dataclass(frozen=True)
class RecordSchema:
    """How one data file's JSON objects are read: the format and the names of its fields.

    The format names the task that reads the records (``Task.record_formats`` in
    :mod:`fedtune.tasks`); the label fields matter to labelled records only.
    """

    fmt: str = "auto"
    group_field: Optional[str] = None
    label_field: str = "label"
    label_names: Optional[Sequence[str]] = None


def record_group(obj: dict[str, Any], schema: RecordSchema) -> Optional[str]:
    """The record's partitioning group (e.g. a speciality), as a string, or None."""
    group = obj.get(schema.group_field) if schema.group_field else None
    return None if group is None else str(group)


def read_jsonl_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for each non-blank line of a JSONL file; DataError on the first bad line.

    Whatever the record format, a line must be UTF-8 and one JSON object; ``where`` is
    "file:line", for the reading task's own errors.
    """
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 (byte {exc.start + 1} of the line). Save the file as "
                                "UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}). Each line must be one JSON object.") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}. "
                                'Write one object per line, e.g. {"text": "..."}.')
            yield where, obj
