"""The built-in demo corpus: invented clinical notes from several specialities.

Each speciality has its own vocabulary and note structure, so a Dirichlet split by
speciality gives sites that genuinely differ (a cardiology-heavy hospital, a
dermatology clinic...).  Everything is generated from templates under a seed: no
real patient, no download, and enough regularity that a small model's held-out
perplexity visibly falls within a few federated rounds.
"""

from __future__ import annotations

import functools
import random

from fedtune.data.records import Record

_SPECIALITIES: dict[str, dict[str, list[str]]] = {
    "cardiology": {
        "complaint": ["chest pain on exertion", "palpitations at night", "shortness of breath when lying flat",
                      "ankle swelling", "a fainting episode while walking"],
        "finding": ["ECG shows atrial fibrillation", "troponin is mildly raised", "echo shows reduced ejection fraction",
                    "blood pressure is 168/96", "a systolic murmur is heard at the apex"],
        "plan": ["start a beta blocker and review in two weeks", "arrange coronary angiography",
                 "begin anticoagulation after bleeding risk review", "increase the diuretic and weigh daily",
                 "refer for a 24 hour Holter monitor"],
    },
    "dermatology": {
        "complaint": ["an itchy rash on both elbows", "a changing mole on the back", "dry scaling patches on the scalp",
                      "painful blisters on the hands", "facial redness that worsens in sunlight"],
        "finding": ["well demarcated plaques with silvery scale", "an asymmetric pigmented lesion of 7 mm",
                    "vesicles along a single dermatome", "comedones and inflamed papules", "erythema over the cheeks"],
        "plan": ["apply a topical steroid twice daily for two weeks", "excise the lesion and send for histology",
                 "start an oral antiviral today", "begin a topical retinoid at night", "advise sun protection and review"],
    },
    "oncology": {
        "complaint": ["weight loss over three months", "a new lump in the left breast", "persistent cough with blood",
                      "fatigue during the second cycle", "bone pain in the lower back"],
        "finding": ["CT shows a 3 cm mass in the right lung", "biopsy confirms adenocarcinoma",
                    "neutrophil count is low after chemotherapy", "tumour markers have fallen", "MRI shows a spinal lesion"],
        "plan": ["discuss at the tumour board on Friday", "delay the next cycle by one week",
                 "start palliative radiotherapy", "continue the current regimen", "refer to the breast surgeon"],
    },
    "paediatrics": {
        "complaint": ["fever and ear pulling for two days", "a barking cough at night", "poor feeding and fewer wet nappies",
                      "a wheeze after a cold", "a rash with fever in a toddler"],
        "finding": ["the left eardrum is red and bulging", "mild stridor at rest", "signs of mild dehydration",
                    "oxygen saturation is 94 percent", "the rash blanches under pressure"],
        "plan": ["give paracetamol and review if no better in 48 hours", "give a single dose of dexamethasone",
                 "start oral rehydration and observe feeds", "use a spacer with salbutamol as needed",
                 "reassure the parents and give safety net advice"],
    },
    "orthopaedics": {
        "complaint": ["knee pain after a football tackle", "wrist pain after a fall", "stiffness in the right hip",
                      "low back pain lifting boxes", "shoulder pain reaching overhead"],
        "finding": ["the knee is swollen with a positive Lachman test", "X-ray shows a distal radius fracture",
                    "reduced internal rotation of the hip", "no neurological deficit in the legs",
                    "painful arc between 60 and 120 degrees"],
        "plan": ["arrange an MRI of the knee and physiotherapy", "apply a cast for six weeks",
                 "list for hip replacement", "keep active and use simple analgesia", "give a subacromial injection"],
    },
    "neurology": {
        "complaint": ["sudden weakness of the left arm", "recurrent headaches with aura", "tingling in both feet",
                      "a first seizure at work", "tremor of the right hand at rest"],
        "finding": ["CT head shows no bleed", "reflexes are reduced at the ankles", "MRI shows white matter lesions",
                    "EEG shows focal slowing", "rigidity with cogwheeling on the right"],
        "plan": ["give thrombolysis within the time window", "start migraine prophylaxis",
                 "check B12 and glucose tolerance", "advise no driving and start an antiepileptic",
                 "trial levodopa and review in clinic"],
    },
}

_AGES = list(range(2, 91))
_SEXES = ["male", "female"]
_OPENERS = ["{spec} clinic note.", "{spec} review.", "{spec} referral letter.", "{spec} ward round."]


def speciality_names() -> list[str]:
    return sorted(_SPECIALITIES)


def make_note(rng: random.Random, speciality: str) -> str:
    vocab = _SPECIALITIES[speciality]
    opener = rng.choice(_OPENERS).format(spec=speciality.capitalize())
    return (
        f"{opener} A {rng.choice(_AGES)} year old {rng.choice(_SEXES)} presents with {rng.choice(vocab['complaint'])}. "
        f"On examination {rng.choice(vocab['finding'])}. Plan: {rng.choice(vocab['plan'])}."
    )


def demo_corpus(n_records: int, seed: int = 0) -> list[Record]:
    """``n_records`` notes, specialities in equal shares, labelled by ``group``.

    Built once per process and size: a simulation's checks, its server's held-out split
    and its in-process sites each read the corpus, and at 10,000 sites (30,000 notes)
    each build took a second.  Records are frozen; each caller gets its own list.
    """
    return list(_demo_notes(n_records, seed))


@functools.lru_cache(maxsize=4)
def _demo_notes(n_records: int, seed: int) -> tuple[Record, ...]:
    rng = random.Random(seed)
    names = speciality_names()
    return tuple(Record(prompt="", response=make_note(rng, names[i % len(names)]), group=names[i % len(names)])
                 for i in range(n_records))


def demo_classification_corpus(n_records: int, seed: int = 0) -> list[Record]:
    """The demo notes labelled by speciality (class index in :func:`speciality_names` order).

    The opening sentence names the speciality, so it is left out: the classifier must
    tell cardiology from dermatology by the complaint, finding and plan.
    """
    names = speciality_names()
    records = []
    for record in demo_corpus(n_records, seed):
        body = record.response.split(". ", 1)[1]
        records.append(Record(prompt="", response=body, group=record.group, label=names.index(str(record.group))))
    return records
