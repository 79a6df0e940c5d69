"""Redaction of personal data in prompts that a policy keeps as `redacted`.

Each kind of identifier is found by a pattern and, where the identifier has one, confirmed by
its checksum, so that an arbitrary long number is not taken for a card or an IBAN:

- EMAIL        addresses like jane.doe+tag@mail.example.org
- PHONE        international (+44 20 7946 0958, +4915112345678) and national numbers written
               in groups (020 7946 0958, (415) 555-0132, 06 12 34 56 78); 7 to 15 digits
- CARD         payment card numbers of 13 to 19 digits, plain or grouped, Luhn-checked
- IBAN         ISO 13616 account numbers, plain or in groups of four, length per country and
               mod-97 checked
- NATIONAL_ID  US social security numbers (123-45-6789, invalid areas excluded) and UK
               National Insurance numbers (QQ 12 34 56 C)

Detectors run in that order of specificity (IBAN and card before phone, which would otherwise
claim their digits); a later detector never takes text an earlier one matched. Each finding is
replaced by a typed placeholder such as [EMAIL]. Recall and precision are measured on a labelled
synthetic set (citadel.residency.synthetic; `python -m bench.redaction`).
"""

import re
from dataclasses import dataclass

PLACEHOLDERS = {
    "EMAIL": "[EMAIL]",
    "PHONE": "[PHONE]",
    "CARD": "[CARD]",
    "IBAN": "[IBAN]",
    "NATIONAL_ID": "[NATIONAL_ID]",
}
TYPES = tuple(PLACEHOLDERS)


@dataclass(frozen=True)
class Finding:
    type: str
    start: int
    end: int


# Lengths of IBANs by country (ISO 13616 registry, the common ones and all of the EEA).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AT": 20, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21, "CY": 28,
    "CZ": 24, "DE": 22, "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GI": 23,
    "GL": 18, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18, "NO": 15, "PL": 28, "PT": 25, "QA": 29, "RO": 24,
    "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TR": 26, "UA": 29, "VA": 22,
}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,63})@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])")
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2})(\d{2})")
_CARD = re.compile(r"(?<![\w+-])\d(?:[ -]?\d){12,18}(?![\d-])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_NINO = re.compile(r"(?<![A-Za-z0-9])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
                   r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,6}"  # international
    r"|\(\d{2,5}\)[ .-]?\d{2,5}(?:[ .-]\d{2,5}){0,3}"  # (415) 555-0132
    r"|\d{2,5}(?:[ .-]\d{2,5}){2,5}"  # 020 7946 0958, 06 12 34 56 78
    r"|0\d{2,4}[ .-]\d{5,8}"  # 030 12345678
    r")(?![\w-])"
)
# Shapes a phone number candidate may have that are something else: dates, and SSN-shaped
# numbers that the SSN rules refused (area 000, 666 or 9xx are never issued).
_NOT_PHONE = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|\d{3}-\d{2}-\d{4}")


_IBAN_LIKE_BEFORE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4})* ?$")


def _inside_iban_like(text: str, start: int) -> bool:
    """Whether `start` continues an IBAN-shaped string (one whose check failed): its digit
    groups are then not taken for a card or a phone number."""
    match = _IBAN_LIKE_BEFORE.search(text[max(0, start - 40):start])
    if match is None:
        return False
    compact = match.group().replace(" ", "")
    return len(compact) < IBAN_LENGTHS.get(compact[:2], 34)  # a complete IBAN ends before `start`


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(compact: str) -> bool:
    """ISO 7064 mod 97-10 over the rearranged account number; `compact` has no spaces."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact.isalnum():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _ibans(text: str):
    for match in _IBAN_START.finditer(text):
        expected = IBAN_LENGTHS.get(match.group(1))
        if expected is None:
            continue
        compact, end, index = match.group(1) + match.group(2), match.end(), match.end()
        while len(compact) < expected and index < len(text):
            char = text[index]
            if char == " " and index + 1 < len(text) and text[index + 1].isalnum() and text[index - 1] != " ":
                index += 1
                continue
            if not (char.isdigit() or "A" <= char <= "Z"):
                break
            compact += char
            index += 1
            end = index
        following = text[end:end + 1]
        if len(compact) == expected and not following.isalnum() and iban_valid(compact):
            yield match.start(), end


def _cards(text: str):
    for match in _CARD.finditer(text):
        value = match.group()
        if _inside_iban_like(text, match.start()):
            continue
        # The pattern is greedy: a number written just after the card (an expiry year) joins it.
        # Try the whole run, then without its trailing groups, longest first.
        ends = [len(value)] + [i for i in range(len(value) - 1, 0, -1) if value[i] in " -"]
        for end in ends:
            digits = re.sub(r"\D", "", value[:end])
            if 13 <= len(digits) <= 19 and luhn_valid(digits):
                yield match.start(), match.start() + end
                break


def _phones(text: str):
    for match in _PHONE.finditer(text):
        value = match.group()
        digits = sum(char.isdigit() for char in value)
        if not 7 <= digits <= 15 or _NOT_PHONE.fullmatch(value) or _inside_iban_like(text, match.start()):
            continue
        yield match.start(), match.end()


def _pattern(regex):
    return lambda text: ((m.start(), m.end()) for m in regex.finditer(text))


# Most specific first: a later detector never takes text that an earlier one matched.
_DETECTORS = (
    ("EMAIL", _pattern(_EMAIL)),
    ("IBAN", _ibans),
    ("CARD", _cards),
    ("NATIONAL_ID", _pattern(_SSN)),
    ("NATIONAL_ID", _pattern(_NINO)),
    ("PHONE", _phones),
)


def find(text: str) -> list[Finding]:
    """The personal identifiers in `text`, in order, none overlapping another."""
    findings: list[Finding] = []
    for kind, detector in _DETECTORS:
        for start, end in detector(text):
            if not any(start < f.end and f.start < end for f in findings):
                findings.append(Finding(kind, start, end))
    return sorted(findings, key=lambda f: f.start)


def redact(text: str) -> str:
    """`text` with each identifier replaced by its typed placeholder, e.g. [EMAIL]."""
    out, last = [], 0
    for finding in find(text):
        out.append(text[last:finding.start])
        out.append(PLACEHOLDERS[finding.type])
        last = finding.end
    out.append(text[last:])
    return "".join(out)
