"""A labelled synthetic test set for redaction, and its scoring: recall and precision per type.

Each sample is a short prompt-like text with planted identifiers whose spans are known, and
decoys that look like identifiers but are not (dates, amounts, order numbers, card-like numbers
that fail Luhn, IBAN-like strings with a wrong check, version strings). Seeded: the same seed
gives the same set. Formats vary the way people write them (grouped, plain, international).
"""

import random
import string
from dataclasses import dataclass, field

from citadel.residency.redaction import IBAN_LENGTHS, TYPES, find, luhn_valid


@dataclass
class Sample:
    text: str
    labels: list[tuple[str, int, int]] = field(default_factory=list)  # (type, start, end)


FIRST = ["jane", "john", "maria", "li", "ahmed", "olga", "pierre", "sofia", "kwame", "yuki", "anna", "lars"]
LAST = ["doe", "smith", "garcia", "chen", "khan", "petrova", "martin", "rossi", "mensah", "tanaka", "berg"]
DOMAINS = ["example.org", "mail.example.com", "hospital.example.de", "bank.example.co.uk", "corp.example.fr",
           "uni.example.edu", "clinic.example.nl"]


def _email(rng: random.Random) -> str:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    local = rng.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}_{last}{rng.randint(1, 99)}",
                        f"{first}+{rng.choice(['work', 'news', 'x'])}", f"{last}.{first}-{rng.randint(1, 9)}"])
    if rng.random() < 0.2:
        local = local.capitalize()
    return f"{local}@{rng.choice(DOMAINS)}"


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _phone(rng: random.Random) -> str:
    formats = [
        lambda: f"({rng.randint(201, 989)}) {rng.randint(200, 999)}-{_digits(rng, 4)}",
        lambda: f"{rng.randint(201, 989)}-{rng.randint(200, 999)}-{_digits(rng, 4)}",
        lambda: f"{rng.randint(201, 989)}.{rng.randint(200, 999)}.{_digits(rng, 4)}",
        lambda: f"+1 {rng.randint(201, 989)} {rng.randint(200, 999)} {_digits(rng, 4)}",
        lambda: f"+44 20 {_digits(rng, 4)} {_digits(rng, 4)}",
        lambda: f"+44 7{_digits(rng, 3)} {_digits(rng, 6)}",
        lambda: f"020 {_digits(rng, 4)} {_digits(rng, 4)}",
        lambda: f"+49 30 {_digits(rng, 8)}",
        lambda: f"+49{rng.choice(['151', '160', '176'])}{_digits(rng, 8)}",
        lambda: f"030 {_digits(rng, 8)}",
        lambda: "+33 " + " ".join([str(rng.randint(1, 9))] + [_digits(rng, 2) for _ in range(4)]),
        lambda: "0" + str(rng.randint(1, 7)) + " " + " ".join(_digits(rng, 2) for _ in range(4)),
        lambda: f"+31 6 {_digits(rng, 8)}",
    ]
    return rng.choice(formats)()


def _luhn_complete(rng: random.Random, prefix: str, length: int) -> str:
    body = prefix + _digits(rng, length - len(prefix) - 1)
    for check in string.digits:
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable: one check digit always completes a Luhn number")


def _group(number: str, sizes: list[int], sep: str) -> str:
    parts, index = [], 0
    for size in sizes:
        parts.append(number[index:index + size])
        index += size
    return sep.join(parts)


def _card(rng: random.Random) -> str:
    kind = rng.choice(["visa", "mastercard", "amex", "discover", "visa"])
    if kind == "amex":
        number = _luhn_complete(rng, rng.choice(["34", "37"]), 15)
        return rng.choice([number, _group(number, [4, 6, 5], " "), _group(number, [4, 6, 5], "-")])
    prefix = {"visa": "4", "mastercard": str(rng.randint(51, 55)), "discover": "6011"}[kind]
    number = _luhn_complete(rng, prefix, 16)
    return rng.choice([number, _group(number, [4] * 4, " "), _group(number, [4] * 4, "-")])


IBAN_BODIES = {  # country: a function of rng giving the BBAN (what follows the check digits)
    "DE": lambda rng: _digits(rng, 18),
    "GB": lambda rng: "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + _digits(rng, 14),
    "FR": lambda rng: _digits(rng, 23),
    "NL": lambda rng: "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + _digits(rng, 10),
    "ES": lambda rng: _digits(rng, 20),
    "IT": lambda rng: rng.choice(string.ascii_uppercase) + _digits(rng, 22),
    "CH": lambda rng: _digits(rng, 17),
    "BE": lambda rng: _digits(rng, 12),
}


def iban_with_check(country: str, bban: str, valid: bool = True) -> str:
    rearranged = bban + country + "00"
    check = 98 - int("".join(str(int(c, 36)) for c in rearranged)) % 97
    if not valid:
        check = (check + 1 + (check == 97)) % 97 or 2
    iban = f"{country}{check:02d}{bban}"
    assert len(iban) == IBAN_LENGTHS[country]
    return iban


def _iban(rng: random.Random, valid: bool = True) -> str:
    country = rng.choice(list(IBAN_BODIES))
    iban = iban_with_check(country, IBAN_BODIES[country](rng), valid)
    return rng.choice([iban, " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))])


NINO_FIRST = "ABCEGHJKLMNOPRSTWXYZ"
NINO_SECOND = "ABCEGHJKLMNPRSTWXYZ"


def _national_id(rng: random.Random) -> str:
    if rng.random() < 0.5:
        area = rng.choice([n for n in range(1, 900) if n != 666])
        return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    while True:
        prefix = rng.choice(NINO_FIRST) + rng.choice(NINO_SECOND)
        if prefix not in {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}:
            break
    digits = _digits(rng, 6)
    suffix = rng.choice("ABCD")
    if rng.random() < 0.5:
        return f"{prefix} {digits[:2]} {digits[2:4]} {digits[4:]} {suffix}"
    return f"{prefix}{digits}{suffix}"


GENERATORS = {"EMAIL": _email, "PHONE": _phone, "CARD": _card, "IBAN": _iban, "NATIONAL_ID": _national_id}


def _decoy(rng: random.Random) -> str:
    choices = [
        lambda: f"{rng.randint(2000, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(2000, 2030)}",
        lambda: f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(2000, 2030)}",
        lambda: f"EUR {rng.randint(1, 99)},{_digits(rng, 3)}.{_digits(rng, 2)}",
        lambda: f"order #{_digits(rng, 9)}",
        lambda: f"INV-{rng.randint(2000, 2030)}-{_digits(rng, 5)}",
        lambda: f"v{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 20)}",
        lambda: f"{rng.randint(10, 23)}:{rng.randint(10, 59)}",
        lambda: _not_luhn(rng),
        lambda: _iban(rng, valid=False),
        lambda: f"room {rng.randint(100, 999)}, floor {rng.randint(1, 12)}",
        lambda: f"patient ref {''.join(rng.choice(string.ascii_uppercase) for _ in range(3))}{_digits(rng, 5)}",
    ]
    return rng.choice(choices)()


def _not_luhn(rng: random.Random) -> str:
    while True:
        number = "4" + _digits(rng, 15)
        if not luhn_valid(number):
            return _group(number, [4] * 4, " ")


TEMPLATES = [
    "Please contact {x} about the claim.",
    "Patient record: reached at {x}, follow-up next week.",
    "The customer wrote from {x} and asked for a refund.",
    "Details ({x}) were attached to the ticket.",
    "Summarise this note: {x}; the reference is {d}.",
    "{x} is what they gave us on {d}.",
    "Forward the statement to {x} before {d}.",
    "Hi, my details are {x}. Thanks!",
]


def generate(*, seed: int = 0, per_type: int = 200) -> list[Sample]:
    """`per_type` samples for each type, each with one identifier, some with a second one and
    a decoy, shuffled; the same seed always gives the same set."""
    rng = random.Random(seed)
    samples = []
    for kind in TYPES:
        for _ in range(per_type):
            template = rng.choice(TEMPLATES)
            parts = {"x": (kind, GENERATORS[kind](rng)), "d": (None, _decoy(rng))}
            if rng.random() < 0.3:  # a second identifier of another type in the same text
                other = rng.choice([t for t in TYPES if t != kind])
                template += " Also: {y}."
                parts["y"] = (other, GENERATORS[other](rng))
            samples.append(_fill(template, parts))
    rng.shuffle(samples)
    return samples


def _fill(template: str, parts: dict) -> Sample:
    sample, index = Sample(""), 0
    while index < len(template):
        start = template.find("{", index)
        if start < 0:
            sample.text += template[index:]
            break
        sample.text += template[index:start]
        end = template.index("}", start)
        kind, value = parts[template[start + 1:end]]
        if kind is not None:
            sample.labels.append((kind, len(sample.text), len(sample.text) + len(value)))
        sample.text += value
        index = end + 1
    return sample


def score(samples: list[Sample], finder=find) -> dict[str, dict]:
    """Per type: planted, found (a finding of that type covering the whole planted span),
    recall, and precision (findings of that type that match a planted identifier of that type).
    `finder` is the detector under test (Citadel's by default)."""
    stats = {kind: {"planted": 0, "found": 0, "predicted": 0, "correct": 0} for kind in TYPES}
    for sample in samples:
        findings = finder(sample.text)
        for kind, start, end in sample.labels:
            stats[kind]["planted"] += 1
            if any(f.type == kind and f.start <= start and end <= f.end for f in findings):
                stats[kind]["found"] += 1
        for finding in findings:
            stats[finding.type]["predicted"] += 1
            if any(kind == finding.type and start < finding.end and finding.start < end
                   for kind, start, end in sample.labels):
                stats[finding.type]["correct"] += 1
    for row in stats.values():
        row["recall"] = round(row["found"] / row["planted"], 4) if row["planted"] else None
        row["precision"] = round(row["correct"] / row["predicted"], 4) if row["predicted"] else None
    return stats
