"""Site records read from JSONL, and their validation.

One record is the privacy unit: one text, or one prompt/response pair.  A record
that cannot be read is an error naming the file, the line and the fix, never a
silent skip, because a silently dropped record changes what δ means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


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


def _label_from_json(obj: dict, label_field: str, label_names: Optional[Sequence[str]], where: str) -> int:
    raw = obj.get(label_field)
    names = list(label_names) if label_names is not None else None
    if isinstance(raw, bool) or raw is None:
        raise DataError(f'{where}: missing "{label_field}" field. Labelled records look like '
                        f'{{"text": "...", "{label_field}": 1}} (set data.label_field if yours is named otherwise).')
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and names is not None and raw in names:
        return names.index(raw)
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw)
    # The label's value is not quoted: an error must never carry a record's content.
    raise DataError(f'{where}: the "{label_field}" value is neither a class index nor one of data.label_names. '
                    'Use integers 0..num_labels-1, or list the names in data.label_names.')


def _record_from_json(obj: object, fmt: str, group_field: Optional[str], where: str,
                      label_field: str = "label", label_names: Optional[Sequence[str]] = None) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}. "
                        'Write one object per line, e.g. {"text": "..."}.')
    group = obj.get(group_field) if group_field else None
    group = None if group is None else str(group)
    if fmt == "auto":
        fmt = "instruction" if "prompt" in obj or "response" in obj else "text"
    if fmt == "labelled":
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f'{where}: missing or empty "text" field. Labelled records look like '
                            f'{{"text": "...", "{label_field}": 1}}.')
        label = _label_from_json(obj, label_field, label_names, where)
        # Without a group label, the Dirichlet partitioner skews sites by class.
        return Record(prompt="", response=text, group=group if group is not None else str(label), label=label)
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


def load_jsonl(path: str | Path, fmt: str = "auto", group_field: Optional[str] = None,
               label_field: str = "label", label_names: Optional[Sequence[str]] = None) -> list[Record]:
    """Read every record of a JSONL file; raise DataError on the first malformed line."""
    path = Path(path)
    records: list[Record] = []
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
            records.append(_record_from_json(obj, fmt, group_field, where, label_field, label_names))
    if not records:
        raise DataError(f"{path}: no records. Give a JSONL file with one JSON object per line.")
    return records
