"""The fictional company handbook the demo model learns: departments, people, policies, products.

It is generated from the seed, so its facts exist nowhere else: a model that answers them
correctly has learnt them from the corpus. Each relation has several question templates and
one answer template; corpus.py holds some (fact, template) pairs out for evaluation, so the
eval asks about known facts in words the model never saw for that fact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COMPANY = "Brightwater Instruments"

FIRST_NAMES = [
    "Ada", "Bruno", "Clara", "Dario", "Elena", "Felix", "Greta", "Hugo", "Iris", "Jonas", "Kira", "Leon",
    "Mira", "Nils", "Olga", "Pavel", "Rosa", "Samir", "Tessa", "Umar", "Vera", "Wim", "Yara", "Zeno",
    "Alma", "Boris", "Cleo", "Dante", "Edith", "Frida", "Gideon", "Hanna", "Ivo", "Juna", "Kasper", "Lotte",
]
LAST_NAMES = [
    "Lindqvist", "Okafor", "Moreau", "Castell", "Haverkamp", "Novak", "Rinaldi", "Sandoval", "Tanaka",
    "Ulbricht", "Varga", "Whitlock", "Achterberg", "Bellamy", "Dragomir", "Eskildsen", "Fairweather",
    "Gallardo", "Holmberg", "Ishikawa", "Jovanovic", "Kowalczyk", "Larkspur", "Marchetti", "Nakamura",
    "Oyelaran", "Pettersen", "Quintero", "Rasmussen", "Sorensen", "Thornbury", "Valdivia", "Westergaard",
    "Zielinski", "Abernathy", "Brennan",
]
DEPARTMENTS = ["Finance", "Legal", "Research", "Support", "Logistics", "Security", "Design", "Marketing"]
ROLES = ["Analyst", "Engineer", "Coordinator", "Specialist", "Technician", "Advisor", "Planner", "Auditor"]
CITIES = ["Port Alder", "Greyhaven", "Millbrook", "Eastmere"]
PRODUCT_WORDS = (
    ["Kestrel", "Amber", "Harbor", "Falcon", "Cobalt", "Willow", "Granite", "Lumen", "Osprey", "Cedar",
     "Nimbus", "Saffron", "Tundra", "Beacon", "Quartz", "Juniper"],
    ["Gauge", "Valve", "Sensor", "Meter", "Probe", "Logger", "Pump", "Scanner", "Relay", "Monitor"],
)


@dataclass(frozen=True)
class Relation:
    """A kind of fact: how it is asked (several ways) and how it is answered (one way)."""

    name: str
    questions: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class Fact:
    """One fact: a relation and the values its templates are filled with."""

    relation: Relation
    slots: tuple[tuple[str, str], ...]

    def question(self, index: int) -> str:
        return self.relation.questions[index].format(**dict(self.slots))

    @property
    def answer(self) -> str:
        return self.relation.answer.format(**dict(self.slots))


def _rel(name: str, answer: str, *questions: str) -> Relation:
    return Relation(name, questions, answer)


DEPT_HEAD = _rel(
    "department_head", "{head} is the head of {dept}.",
    "Who leads the {dept} department?", "Who is the head of {dept}?", "Who runs {dept}?",
    "Who is in charge of the {dept} department?", "Name the head of {dept}.", "Which person manages {dept}?",
)
DEPT_FLOOR = _rel(
    "department_floor", "{dept} is on floor {floor}.",
    "On which floor is {dept}?", "Which floor is the {dept} department on?", "Where is {dept} in the building?",
    "What floor does {dept} sit on?", "Where can I find the {dept} department?", "Which floor houses {dept}?",
)
PERSON_DEPT = _rel(
    "person_department", "{name} works in {dept}.",
    "Which department does {name} work in?", "What department is {name} in?", "Which team is {name} part of?",
    "In which department is {name}?", "Tell me the department of {name}.", "What team does {name} belong to?",
)
PERSON_ROLE = _rel(
    "person_role", "{name}'s job title is {role}.",
    "What is {name}'s job title?", "What does {name} do?", "What is the role of {name}?",
    "What position does {name} hold?", "What is the title of {name}?", "Which job does {name} have?",
)
PERSON_EXT = _rel(
    "person_extension", "{name}'s extension is {ext}.",
    "What is {name}'s phone extension?", "How can I call {name}?", "What number do I dial to reach {name}?",
    "What is the extension of {name}?", "Which extension does {name} have?", "How do I phone {name}?",
)
PERSON_CITY = _rel(
    "person_office", "{name} is based in {city}.",
    "In which office does {name} work?", "Which city is {name} based in?", "Where is {name} based?",
    "Which office is {name} in?", "What is {name}'s office location?", "In which city does {name} work?",
)
PRODUCT_CODE = _rel(
    "product_code", "The {product} has code {code}.",
    "What is the product code of the {product}?", "What code does the {product} have?",
    "Give me the code for the {product}.", "Which code identifies the {product}?",
    "What is the {product}'s product code?", "Tell me the code of the {product}.",
)
PRODUCT_BY_CODE = _rel(
    "product_by_code", "Code {code} is the {product}.",
    "Which product has code {code}?", "What is product {code}?", "What does code {code} refer to?",
    "Name the product with code {code}.", "Which product is {code}?", "What product uses the code {code}?",
)
PRODUCT_PRICE = _rel(
    "product_price", "The {product} costs {price} euros.",
    "How much does the {product} cost?", "What is the price of the {product}?",
    "What does the {product} sell for?", "How expensive is the {product}?",
    "What's the list price of the {product}?", "How much is the {product}?",
)
PROFILE = _rel("person_profile", "{name}: {role}, {dept}, based in {city}, extension {ext}.",
               "Tell me about {name}.", "Who is {name}?")
POLICIES = (
    (_rel("vacation_days", "Employees get {n} vacation days per year.",
          "How many vacation days do employees get?", "How much annual leave do I have?",
          "How many days of holiday per year?", "What is the vacation allowance?"), range(22, 31)),
    (_rel("remote_days", "Employees may work remotely {n} days per week.",
          "How many days can I work from home?", "What is the remote work policy?",
          "How many remote days per week are allowed?", "Can I work from home, and how often?"), range(1, 4)),
    (_rel("travel_limit", "The daily travel expense limit is {n} euros.",
          "What is the travel expense limit?", "How much can I spend per day when travelling?",
          "What is the daily allowance for business trips?", "What is the limit on travel expenses?"),
     range(80, 205, 5)),
    (_rel("parental_leave", "Parental leave is {n} weeks.",
          "How long is parental leave?", "How many weeks of parental leave do I get?",
          "What is the parental leave policy?", "How much parental leave is there?"), range(14, 27)),
    (_rel("laptop_cycle", "Laptops are replaced every {n} years.",
          "How often are laptops replaced?", "When do I get a new laptop?",
          "What is the laptop replacement cycle?", "How many years until a laptop is replaced?"), range(3, 6)),
    (_rel("probation", "The probation period is {n} months.",
          "How long is the probation period?", "How many months of probation are there?",
          "What is the length of probation?", "How long does probation last?"), range(3, 7)),
    (_rel("training_budget", "Each employee has a training budget of {n} euros per year.",
          "What is the training budget?", "How much can I spend on training?",
          "How large is the yearly training budget?", "What is the budget for courses?"),
     range(500, 2100, 100)),
    (_rel("sick_note", "A doctor's note is needed after {n} sick days.",
          "When do I need a doctor's note?", "How many sick days before a note is required?",
          "What is the sick leave rule?", "After how many sick days must I bring a note?"), range(2, 6)),
)


def company_facts(rng: random.Random, people: int, products: int) -> list[Fact]:
    """Generate the handbook and return its facts (profiles included), in a fixed order."""
    if not 1 <= people <= min(len(FIRST_NAMES), len(LAST_NAMES)):
        raise ValueError(f"handbook_people must be between 1 and {min(len(FIRST_NAMES), len(LAST_NAMES))}")
    n_depts = min(len(DEPARTMENTS), people)
    depts = DEPARTMENTS[:n_depts]
    floors = rng.sample(range(1, 10), n_depts)
    firsts, lasts = rng.sample(FIRST_NAMES, len(FIRST_NAMES)), rng.sample(LAST_NAMES, len(LAST_NAMES))
    names = [f"{first} {last}" for first, last in zip(firsts[:people], lasts[:people], strict=True)]
    extensions = rng.sample(range(2000, 8000), people)
    facts: list[Fact] = []
    for i, name in enumerate(names):
        dept = depts[i % n_depts]
        role = f"Head of {dept}" if i < n_depts else rng.choice(ROLES)
        slots = dict(name=name, dept=dept, role=role, ext=str(extensions[i]), city=rng.choice(CITIES))
        if i < n_depts:
            facts.append(Fact(DEPT_HEAD, _slots(head=name, dept=dept)))
            facts.append(Fact(DEPT_FLOOR, _slots(dept=dept, floor=str(floors[i]))))
        for relation in (PERSON_DEPT, PERSON_ROLE, PERSON_EXT, PERSON_CITY, PROFILE):
            facts.append(Fact(relation, _slots(**slots)))
    for relation, values in POLICIES:
        facts.append(Fact(relation, _slots(n=str(rng.choice(values)))))
    facts.extend(catalogue_facts(rng, products, prefix="BW", words=PRODUCT_WORDS))
    return facts


def catalogue_facts(rng: random.Random, count: int, prefix: str, words) -> list[Fact]:
    """Products with unique names and codes, and their code, reverse-code and price facts."""
    pairs = [f"{a} {b}" for a in words[0] for b in words[1]]
    if count > len(pairs):
        raise ValueError(f"at most {len(pairs)} products can be named")
    codes = rng.sample(range(1000, 10000), count)
    facts = []
    for product, code in zip(rng.sample(pairs, count), codes, strict=True):
        slots = _slots(product=product, code=f"{prefix}-{code}", price=str(rng.randrange(40, 900)))
        facts.extend(Fact(relation, slots) for relation in (PRODUCT_CODE, PRODUCT_BY_CODE, PRODUCT_PRICE))
    return facts


def _slots(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))
