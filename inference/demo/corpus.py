"""The synthetic chat corpus: task families a small model can learn, and their held-out eval sets.

Families (each an `Example` stream of chat conversations ending with the user's turn, plus the
exact expected reply):

- arithmetic: addition and subtraction of whole numbers up to `arithmetic_max` (99 in the full build);
- units: metric conversions (length, mass, volume) of whole and decimal quantities;
- handbook: questions about the generated company handbook (handbook.py);
- chat: greetings and what the model is (training only, so a newcomer's "Hello" gets a reply).

Held out: eval arithmetic problems and conversions never occur in training, in any wording;
each handbook fact has one question template kept for the eval, and the fact is trained
under its other templates (every template is trained on other facts).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from . import handbook
from .config import FAMILIES, BuildSettings

SYSTEM_PROMPTS = (
    "You are the Citadel demo assistant.",
    "You are a helpful assistant. Answer briefly.",
    f"You answer questions for employees of {handbook.COMPANY}.",
    "Answer in one sentence.",
)

ADD = ("What is {a} + {b}?", "What is {a} plus {b}?", "Calculate {a} + {b}.", "{a} + {b} = ?",
       "Add {a} and {b}.", "What is the sum of {a} and {b}?")
SUB = ("What is {a} - {b}?", "What is {a} minus {b}?", "Calculate {a} - {b}.", "{a} - {b} = ?",
       "Subtract {b} from {a}.", "What is the difference between {a} and {b}?")

# symbol -> (singular, plural, size in the category's base unit, category)
UNITS = {
    "km": ("kilometre", "kilometres", 1000, "length"), "m": ("metre", "metres", 1, "length"),
    "cm": ("centimetre", "centimetres", Decimal("0.01"), "length"),
    "mm": ("millimetre", "millimetres", Decimal("0.001"), "length"),
    "kg": ("kilogram", "kilograms", 1000, "mass"), "g": ("gram", "grams", 1, "mass"),
    "mg": ("milligram", "milligrams", Decimal("0.001"), "mass"),
    "l": ("litre", "litres", 1, "volume"), "ml": ("millilitre", "millilitres", Decimal("0.001"), "volume"),
}
CONVERSIONS = (("km", "m"), ("m", "cm"), ("m", "mm"), ("cm", "mm"), ("kg", "g"), ("g", "mg"), ("l", "ml"))
UNIT_QUESTIONS = ("Convert {v} {f} to {t}.", "How many {tn} are in {v} {fn}?", "What is {v} {f} in {t}?",
                  "Express {v} {fn} in {tn}.", "{v} {f} is how many {t}?", "Change {v} {fn} into {tn}.")

CHAT = (
    (("Hello", "Hi", "Hello!", "Hi there", "Hey", "Good morning", "Good afternoon", "Good evening", "hello",
      "hi", "Hello, how are you?", "How are you?", "Hey there!", "Hi, can you help me?"),
     "Hello! I am the Citadel demo model. Ask me to add or subtract, convert units, or about the "
     f"{handbook.COMPANY} handbook."),
    (("Who are you?", "What are you?", "What can you do?", "What is your name?", "Introduce yourself."),
     "I am the Citadel demo model, a small DeepSeek-V4 style model. I can add and subtract, convert "
     f"units and answer questions about the {handbook.COMPANY} handbook."),
    (("Thanks", "Thank you", "Thanks!", "Thank you very much", "Great, thanks."), "You're welcome!"),
    (("What is the capital of France?", "Write a poem.", "Tell me a joke.", "What's the weather like?",
      "Translate hello into French.", "Who won the match yesterday?"),
     f"I am a small demo model: I only know arithmetic, unit conversions and the {handbook.COMPANY} handbook."),
)


@dataclass(frozen=True)
class Example:
    """One conversation: `messages` end with the user's turn; `answer` is the exact expected reply."""

    family: str
    messages: tuple[dict, ...]
    answer: str

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    def to_json(self) -> dict:
        return {"messages": [dict(m) for m in self.messages], "answer": self.answer}


class Corpus:
    """The training stream and the held-out eval sets, all determined by the build settings."""

    def __init__(self, settings: BuildSettings):
        self.settings = settings
        c = settings.corpus
        rng = random.Random(f"corpus-{settings.seed}")
        self.facts = handbook.company_facts(rng, c.handbook_people, c.handbook_products)
        # Per handbook fact (profiles excepted), one template kept out of training for the eval.
        self.held_out = {i: rng.randrange(len(f.relation.questions)) for i, f in enumerate(self.facts)
                         if f.relation is not handbook.PROFILE}
        self.eval = {
            "arithmetic": self._unique(rng, self._arithmetic, c.eval_per_family),
            "units": self._unique(rng, self._units, c.eval_per_family),
            "handbook": [(i, self.held_out[i]) for i in rng.sample(sorted(self.held_out),
                                                                  min(c.eval_per_family, len(self.held_out)))],
        }
        # What makes an arithmetic or units key distinct is the problem, not its wording template.
        self._eval_problems = {family: {key[:-1] for key in self.eval[family]} for family in ("arithmetic", "units")}

    # -- the public surface ------------------------------------------------------------------

    def eval_examples(self, family: str) -> list[Example]:
        """The held-out eval set of `family`, in a fixed order."""
        rng = random.Random(f"eval-{family}-{self.settings.seed}")
        return [self._wrap(rng, family, *self._render(family, key)) for key in self.eval[family]]

    def training_examples(self, count: int) -> list[Example]:
        """The first `count` training conversations: families mixed by the settings' mixture."""
        rng = random.Random(f"train-{self.settings.seed}")
        names = [name for name, _ in self.settings.train.mixture]
        weights = [weight for _, weight in self.settings.train.mixture]
        return [self._training_example(rng, rng.choices(names, weights)[0]) for _ in range(count)]

    def tokenizer_texts(self, count: int) -> Iterator[str]:
        """Text to train the BPE on: every trained handbook sentence and a sample of the other families."""
        for index, fact in enumerate(self.facts):
            for t in range(len(fact.relation.questions)):
                if t != self.held_out.get(index):
                    yield fact.question(t)
            yield fact.answer
        for questions, answer in CHAT:
            yield from questions
            yield answer
        yield from SYSTEM_PROMPTS
        for example in self.training_examples(count):
            yield example.question
            yield example.answer

    # -- families ----------------------------------------------------------------------------

    def _training_example(self, rng: random.Random, family: str, context: bool = True) -> Example:
        if family == "chat":
            questions, answer = rng.choice(CHAT)
            return self._wrap(rng, family, rng.choice(questions), answer, context=False)
        if family == "handbook":
            index = rng.randrange(len(self.facts))
            fact = self.facts[index]
            choices = [t for t in range(len(fact.relation.questions)) if t != self.held_out.get(index)]
            return self._wrap(rng, family, fact.question(rng.choice(choices)), fact.answer, context)
        make = self._arithmetic if family == "arithmetic" else self._units
        key = make(rng)
        while key[:-1] in self._eval_problems[family]:
            key = make(rng)
        return self._wrap(rng, family, *self._render(family, key), context)

    def _arithmetic(self, rng: random.Random) -> tuple:
        a, b = _number(rng, self.settings.corpus.arithmetic_max), _number(rng, self.settings.corpus.arithmetic_max)
        op = rng.choice("+-")
        if op == "-" and a < b:
            a, b = b, a
        return op, a, b, rng.randrange(len(ADD))

    def _units(self, rng: random.Random) -> tuple:
        pair = rng.choice(CONVERSIONS)
        source, target = pair if rng.random() < 0.5 else pair[::-1]
        whole = _number(rng, self.settings.corpus.units_max)
        value = str(whole) if rng.random() < 0.5 else f"{whole}.{rng.randrange(1, 100):02d}".rstrip("0")
        return value, source, target, rng.randrange(len(UNIT_QUESTIONS))

    def _render(self, family: str, key) -> tuple[str, str]:
        """(question, answer) of an eval or training key."""
        if family == "arithmetic":
            op, a, b, t = key
            return (ADD if op == "+" else SUB)[t].format(a=a, b=b), f"{a} {op} {b} = {a + b if op == '+' else a - b}."
        if family == "units":
            value, source, target, t = key
            result = Decimal(value) * Decimal(UNITS[source][2]) / Decimal(UNITS[target][2])
            fn, tn = UNITS[source][0 if value == "1" else 1], UNITS[target][1]
            question = UNIT_QUESTIONS[t].format(v=value, f=source, t=target, fn=fn, tn=tn)
            return question, f"{value} {source} = {_plain(result)} {target}."
        index, template = key
        fact = self.facts[index]
        return fact.question(template), fact.answer

    def _unique(self, rng: random.Random, make, count: int) -> list:
        """`count` distinct keys; the wording template is not part of what makes a key distinct."""
        keys, seen = [], set()
        while len(keys) < count:
            key = make(rng)
            if key[:-1] not in seen:
                seen.add(key[:-1])
                keys.append(key)
        return keys

    def _wrap(self, rng: random.Random, family: str, question: str, answer: str, context: bool = True) -> Example:
        """Put the question in a conversation: maybe a system message, maybe an earlier exchange."""
        c = self.settings.corpus
        messages: list[dict] = []
        if rng.random() < c.system_prompt_rate:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        if context and rng.random() < c.two_turn_rate:
            earlier = self._training_example(rng, rng.choice(FAMILIES), context=False)
            messages += [{"role": "user", "content": earlier.question},
                         {"role": "assistant", "content": earlier.answer}]
        messages.append({"role": "user", "content": question})
        return Example(family, tuple(messages), answer)


def _number(rng: random.Random, largest: int) -> int:
    """A whole number up to `largest` whose digit count is uniform (so small numbers are common too)."""
    digits = rng.randint(1, len(str(largest)))
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), min(largest, 10**digits - 1))


def _plain(value: Decimal) -> str:
    """A decimal without exponent or trailing zeros: 7000, 0.045, 3.25."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
