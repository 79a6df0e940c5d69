"""The fine-tuning job form: raw HTML inputs turned into job_create's arguments, and the service's
refusal put back next to the field it names.

Deliberately not a Django Form with its own validators: the ranges and choices are
finetune.TrainConfig's, checked once by the service. This only converts text to numbers (a value
that is not a number goes through as text, so the trainer's message names the field) and maps a
refusal's `param` ("citadel.rank", "training_file", ...) to an input.
"""

SETTINGS = ("epochs", "batch_size", "learning_rate", "rank", "alpha", "dropout", "max_seq_len", "lr_schedule",
            "warmup_steps", "checkpoint_every", "eval_every")
"""TrainConfig fields the form offers besides target_modules (sent to job_create as `citadel`)."""
INTEGERS = {"epochs", "batch_size", "rank", "max_seq_len", "warmup_steps", "checkpoint_every", "eval_every", "seed"}
TEXT = {"lr_schedule"}
FIELDS = ("model", "training_file", "validation_file", "suffix", "seed", *SETTINGS, "target_modules",
          "custom_modules")
PARAM_FIELDS = {"hyperparameters.n_epochs": "epochs", "hyperparameters.batch_size": "batch_size",
                "hyperparameters.learning_rate_multiplier": "learning_rate", "file": "training_file"}


def _number(text: str, *, integer: bool):
    """int or float from the input's text; the text itself when it is neither (the service says why)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return value if not integer or not value.is_integer() else int(value)


class JobForm:
    """Values as typed (to show again), the arguments for job_create, and errors by field."""

    def __init__(self, data=None, *, defaults: dict):
        initial = {name: "" for name in FIELDS}
        for name in (*SETTINGS, "target_modules"):
            value = defaults.get(name)
            initial[name] = "" if value is None else value
        if isinstance(initial["target_modules"], list):
            initial["custom_modules"] = ", ".join(initial["target_modules"])
            initial["target_modules"] = "custom"
        self.values = {name: (data.get(name, "").strip() if data is not None else initial[name]) for name in FIELDS}
        self.errors: dict[str, str] = {}
        self.non_field_errors: list[str] = []

    @property
    def model(self) -> str:
        return self.values["model"]

    @property
    def training_file(self) -> str:
        return self.values["training_file"]

    @property
    def validation_file(self) -> str:
        return self.values["validation_file"]

    @property
    def suffix(self) -> str:
        return self.values["suffix"]

    @property
    def seed(self):
        text = self.values["seed"]
        return _number(text, integer=True) if text else None

    @property
    def settings(self) -> dict:
        """The `citadel` block of job_create: only what the user filled in; the rest stays default."""
        out = {}
        for name in SETTINGS:
            text = self.values[name]
            if text == "":
                continue
            out[name] = text if name in TEXT else _number(text, integer=name in INTEGERS)
        preset = self.values["target_modules"]
        if preset == "custom":
            out["target_modules"] = [m for m in self.values["custom_modules"].replace(",", " ").split() if m]
        elif preset:
            out["target_modules"] = preset
        return out

    def add_error(self, error) -> None:
        """Put a CitadelError next to the input its `param` names, or above the form."""
        param = error.param or ""
        field = PARAM_FIELDS.get(param, param.removeprefix("citadel."))
        if field == "target_modules" and self.values["target_modules"] == "custom":
            field = "custom_modules"
        if field in self.values:
            # "citadel.rank: must be ..." reads as "must be ..." under the Rank input.
            self.errors[field] = error.message.removeprefix(f"{param}: ") if param else error.message
        else:
            self.non_field_errors.append(error.message)
