"""Validation of OpenAI request bodies. Errors name the field (OpenAI's `param`).

Fields the OpenAI protocol has but Citadel does not implement yet are refused with a clear
400 rather than silently ignored; unknown fields are ignored, as OpenAI does. Types are checked
as strictly as OpenAI checks them where a loose reading would surprise (`"logprobs": "yes"`).
"""

from rest_framework import serializers

ROLES = ("system", "developer", "user", "assistant", "tool")
UNSUPPORTED = {
    "n": lambda value: value not in (None, 1),
    "echo": lambda value: bool(value),
    "best_of": lambda value: value not in (None, 1),
    "tools": lambda value: bool(value),
    "suffix": lambda value: bool(value),
}


# OpenAI's limits: top_logprobs of chat completions, logprobs of (legacy) completions.
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer: unlike DRF's IntegerField, "3", 3.0 and true are refused, as OpenAI does."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A JSON true or false: unlike DRF's BooleanField, "yes", 1 and "true" are refused."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


def _count_field(limit: int, what: str) -> StrictIntegerField:
    message = f"must be an integer from 0 to {limit} ({what})."
    return StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=limit,
                              error_messages={"invalid": message, "min_value": message, "max_value": message})


class StopField(serializers.Field):
    def to_internal_value(self, data):
        if data is None:
            return []
        items = [data] if isinstance(data, str) else data
        if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
            raise serializers.ValidationError("must be a non-empty string or a list of up to 4 non-empty strings.")
        if len(items) > 4:
            raise serializers.ValidationError("at most 4 stop sequences are allowed.")
        return items

    def to_representation(self, value):
        return value


class SamplingInput(serializers.Serializer):
    model = serializers.CharField()
    max_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=32768)
    temperature = serializers.FloatField(required=False, allow_null=True, min_value=0.0, max_value=2.0)
    top_p = serializers.FloatField(required=False, allow_null=True, min_value=0.0, max_value=1.0)
    top_k = serializers.IntegerField(required=False, allow_null=True, min_value=-1)
    stop = StopField(required=False, allow_null=True)
    seed = serializers.IntegerField(required=False, allow_null=True)
    stream = serializers.BooleanField(required=False, default=False)
    stream_options = serializers.DictField(required=False, allow_null=True)
    default_max_tokens = 256

    def validate(self, attrs):
        for name, unsupported in UNSUPPORTED.items():
            if name in self.initial_data and unsupported(self.initial_data[name]):
                raise serializers.ValidationError({name: "is not supported by Citadel yet; leave it out."})
        if attrs.get("top_p") == 0:
            raise serializers.ValidationError({"top_p": "must be greater than 0."})
        return attrs

    def sampling(self) -> dict:
        """The keyword arguments for inference.SamplingParams."""
        data = self.validated_data
        params = {"max_tokens": data.get("max_tokens") or self.default_max_tokens}
        for name in ("temperature", "top_p", "top_k", "seed"):
            if data.get(name) is not None:
                params[name] = data[name]
        if data.get("stop"):
            params["stop"] = data["stop"]
        return params

    @property
    def include_usage(self) -> bool:
        return bool((self.validated_data.get("stream_options") or {}).get("include_usage"))


class MessageInput(serializers.Serializer):
    role = serializers.ChoiceField(choices=ROLES)
    content = serializers.JSONField()

    def validate_content(self, value):
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
            return "".join(str(part.get("text", "")) for part in value)
        raise serializers.ValidationError("must be a string or a list of {'type': 'text', 'text': ...} parts.")


class ChatCompletionInput(SamplingInput):
    messages = MessageInput(many=True, allow_empty=False)
    max_completion_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=32768)
    logprobs = StrictBooleanField(required=False, allow_null=True,
                                  error_messages={"invalid": "must be true or false."})
    top_logprobs = _count_field(MAX_TOP_LOGPROBS, "how many of the most likely tokens to return at each position")

    def validate(self, attrs):
        attrs = super().validate(attrs)
        if attrs.get("top_logprobs") is not None and not attrs.get("logprobs"):
            raise serializers.ValidationError(
                {"top_logprobs": 'needs "logprobs": true as well; set logprobs to true or leave top_logprobs out.'})
        return attrs

    def sampling(self) -> dict:
        params = super().sampling()
        if self.validated_data.get("max_completion_tokens"):
            params["max_tokens"] = self.validated_data["max_completion_tokens"]
        if self.validated_data.get("logprobs"):
            params["logprobs"] = self.validated_data.get("top_logprobs") or 0
        return params

    def payload(self) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.validated_data["messages"]]
        return {"messages": messages, "sampling": self.sampling()}


class PromptField(serializers.Field):
    def to_internal_value(self, data):
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], str | list):
            data = data[0]  # a batch of one
        if isinstance(data, str) and data:
            return data
        if isinstance(data, list) and data and all(isinstance(t, int) and t >= 0 for t in data):
            return data
        raise serializers.ValidationError(
            "must be a non-empty string or a list of token ids; send one prompt per request.")

    def to_representation(self, value):
        return value


class CompletionInput(SamplingInput):
    prompt = PromptField()
    logprobs = _count_field(MAX_COMPLETION_LOGPROBS, "how many of the most likely tokens to return at each "
                                                     "position, besides the chosen one")
    default_max_tokens = 16

    def validate(self, attrs):
        attrs = super().validate(attrs)
        if self.initial_data.get("top_logprobs") is not None:
            raise serializers.ValidationError(
                {"top_logprobs": "is a chat completions field; /v1/completions takes logprobs, an integer "
                                 f"from 0 to {MAX_COMPLETION_LOGPROBS}, instead."})
        return attrs

    def sampling(self) -> dict:
        params = super().sampling()
        if self.validated_data.get("logprobs") is not None:
            params["logprobs"] = self.validated_data["logprobs"]
        return params

    def payload(self) -> dict:
        return {"prompt": self.validated_data["prompt"], "sampling": self.sampling()}
