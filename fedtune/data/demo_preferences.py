"""The built-in demo preference corpus: dosage instructions, written correctly or not.

Each pair asks for a prescription line.  Both answers name the same drug, dose and
frequency; the chosen one follows the house style of safe prescribing (number, a space,
the lower-case unit, a spelt-out frequency: "250 mg twice daily"), the rejected one
breaks exactly one rule ("250mg", "250 MG", "250 mgs", "250 mg BD").  The preference is
thus a local, consistent rule that a tiny model learns within a few federated rounds,
while prompts and answers vary enough (patient initials, drug, dose, frequency, indication)
that nearly every held-out pair is new text.  Generated under a seed: no real patient, no download.
"""

from __future__ import annotations

import random

from fedtune.data.preferences import PreferenceRecord

# speciality -> (drug, doses in mg, indication); short, so a pair fits the tiny test model's window
_DRUGS: dict[str, list[tuple[str, tuple[int, ...], str]]] = {
    "cardiology": [("bisoprolol", (1, 2, 5, 10), "atrial fibrillation"), ("ramipril", (2, 5, 10), "hypertension"),
                   ("atorvastatin", (10, 20, 40, 80), "angina")],
    "infection": [("amoxicillin", (250, 500), "otitis media"), ("doxycycline", (100, 200), "acne"),
                  ("nitrofurantoin", (50, 100), "cystitis")],
    "neurology": [("levetiracetam", (250, 500, 750), "epilepsy"), ("gabapentin", (300, 600), "nerve pain"),
                  ("sumatriptan", (50, 100), "migraine")],
    "paediatrics": [("paracetamol", (120, 240, 500), "fever"), ("ibuprofen", (100, 200), "ear pain"),
                    ("prednisolone", (10, 20), "croup")],
}
_FREQUENCIES = ("once daily", "twice daily", "three times daily", "at night")
# The abbreviations safe-prescribing guidance warns against, for the frequency error.
_ABBREVIATIONS = {"once daily": "OD", "twice daily": "BD", "three times daily": "TDS", "at night": "ON"}
_ASKS = ("{who}: prescribe {drug} {dose} milligrams {freq}. ",
         "Dose line for {who}: {drug}, {dose} milligrams, {freq}. ",
         "{who}, {indication}: write up {drug} {dose} milligrams {freq}. ")
_LETTERS = "ABCDEFGHJKLMNPRSTW"


def _answer(drug: str, amount: str, freq: str) -> str:
    return f"{drug.capitalize()} {amount} {freq}."


def _rejected(rng: random.Random, drug: str, dose: int, freq: str) -> str:
    """The same line with one rule broken (which one is drawn)."""
    broken = rng.randrange(4)
    if broken == 0:
        return _answer(drug, f"{dose}mg", freq)
    if broken == 1:
        return _answer(drug, f"{dose} MG", freq)
    if broken == 2:
        return _answer(drug, f"{dose} mgs", freq)
    return _answer(drug, f"{dose} mg", _ABBREVIATIONS[freq])


def make_pair(rng: random.Random, speciality: str, number: int) -> PreferenceRecord:
    drug, doses, indication = rng.choice(_DRUGS[speciality])
    dose, freq = rng.choice(doses), rng.choice(_FREQUENCIES)
    # The request spells the dose out, so the answer's format is the model's own choice.
    who = f"{rng.choice(_LETTERS)}.{rng.choice(_LETTERS)}."  # the patient's initials
    prompt = rng.choice(_ASKS).format(who=who, indication=indication, drug=drug, dose=dose, freq=freq)
    return PreferenceRecord(prompt=prompt, response=_answer(drug, f"{dose} mg", freq),
                            rejected=_rejected(rng, drug, dose, freq), group=speciality,
                            where=f"demo pair {number}")


def demo_preference_corpus(n_records: int, seed: int = 0) -> list[PreferenceRecord]:
    """``n_records`` pairs, specialities in equal shares, grouped by speciality."""
    rng = random.Random(seed)
    names = sorted(_DRUGS)
    return [make_pair(rng, names[i % len(names)], i) for i in range(n_records)]
