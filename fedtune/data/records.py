"""Site records read from JSONL, and their validation.

One record is the privacy unit: one text, or one prompt/response pair.  A record
that cannot be read is an error naming the file, the line and the fix, never a
silent skip, because a silently dropped record changes what δ means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class DataError(ValueError):
    """The data file is unusable; the message says where and how to fix it."""


@dataclass(frozen=True)
class Record:
    """One training record.  Loss is taken on ``response`` only; plain text has no prompt."""

    prompt: str
    response: str
    group: Optional[str] = None


def _record_from_json(obj: object, fmt: str, group_field: Optional[str], where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}. "
                        'Write one object per line, e.g. {"text": "..."}.')
    group = obj.get(group_field) if group_field else None
    group = None if group is None else str(group)
    if fmt == "auto":
        fmt = "instruction" if "prompt" in obj or "response" in obj else "text"
    if fmt == "text":
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f'{where}: missing or empty "text" field. '
                            'Plain-text records look like {"text": "..."}; instruction records like '
                            '{"prompt": "...", "response": "..."} (set data.format accordingly).')
        return Record(prompt="", response=text, group=group)
    prompt, response = obj.get("prompt"), obj.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
        raise DataError(f'{where}: instruction records need string "prompt" and non-empty "response" fields, '
                        'e.g. {"prompt": "Summarise: ...", "response": "..."}.')
    return Record(prompt=prompt, response=response, group=group)


def load_jsonl(path: str | Path, fmt: str = "auto", group_field: Optional[str] = None) -> list[Record]:
    """Read every record of a JSONL file; raise DataError on the first malformed line."""
    path = Path(path)
    records: list[Record] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}). Each line must be one JSON object.") from exc
            records.append(_record_from_json(obj, fmt, group_field, where))
    if not records:
        raise DataError(f"{path}: no records. Give a JSONL file with one JSON object per line.")
    return records
