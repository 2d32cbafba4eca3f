"""Preference pairs read from JSONL: a prompt, the chosen answer and the rejected one.

Two shapes are read, both common in released preference data:

* ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (UltraFeedback-style, TRL's "explicit prompt");
* ``{"chosen": ..., "rejected": ...}``: two whole dialogues that share their beginning, as in
  Anthropic's hh-rlhf.  The shared beginning is the prompt (:func:`split_shared_prefix`).

One pair is one record, the privacy unit of DPO.  A pair that cannot teach a preference
(an empty or identical answer, a missing field) is an error naming the line, never a
silent skip: a silently dropped record changes what δ means.  Errors never quote a record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtune.data.records import DataError, Record, RecordSchema, record_group

EXAMPLE = '{"prompt": "...", "chosen": "...", "rejected": "..."}'


@dataclass(frozen=True)
class PreferenceRecord(Record):
    """``response`` is the chosen answer, ``rejected`` the answer it is preferred to.

    ``where`` ("file:line", or the demo pair's number) lets a check that needs the
    tokenizer (a prompt longer than data.max_length) name the line, as parsing errors do.
    """

    rejected: str = ""
    where: str = ""


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two dialogues that share their beginning.

    The prompt is the longest common prefix, cut back to the start of the word where the
    two first differ and before the whitespace that precedes it, so that a shared first
    letter ("Sure" / "Sorry") stays in both answers and the answers keep their leading
    space (how BPE vocabularies spell a word after a space; TRL's ``extract_prompt`` does
    the same for the space).
    """
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    if common < min(len(chosen), len(rejected)):
        while common > 0 and not chosen[common - 1].isspace():
            common -= 1
    while common > 0 and chosen[common - 1].isspace():
        common -= 1
    return chosen[:common], chosen[common:], rejected[common:]


def _text(obj: dict[str, Any], name: str, where: str, allow_empty: bool = False) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise DataError(f'{where}: missing or non-string "{name}" field. Preference records look like {EXAMPLE}, '
                        'or {"chosen": "...", "rejected": "..."} with the prompt as their shared beginning.')
    if not allow_empty and not value.strip():
        raise DataError(f'{where}: the "{name}" field is empty. '
                        "Each pair needs a non-empty chosen and rejected answer.")
    return value


def parse_preference(obj: dict[str, Any], schema: RecordSchema, where: str) -> PreferenceRecord:
    """One JSON object as a pair; DataError naming ``where`` if it cannot teach a preference."""
    chosen, rejected = _text(obj, "chosen", where), _text(obj, "rejected", where)
    if "prompt" in obj:
        prompt = _text(obj, "prompt", where, allow_empty=True)
    else:
        prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
    if not chosen.strip() or not rejected.strip():
        raise DataError(f"{where}: after the shared prompt one answer is empty (one dialogue is the other's "
                        "beginning). Give both answers, or an explicit \"prompt\" field.")
    if chosen == rejected:
        raise DataError(f'{where}: "chosen" and "rejected" are identical, so the pair expresses no preference. '
                        "Remove the line or fix one answer.")
    return PreferenceRecord(prompt=prompt, response=chosen, rejected=rejected, group=record_group(obj, schema),
                            where=where)
