"""What is kept of a prompt once its job is over, by the policy's prompt retention.

A job's row carries the prompt while the job is in flight: the worker reads it from there and a
lost broker message is recovered from there (the broker carries job ids only). When the job ends,
in the same transaction, the prompt is cut down to what the policy keeps:

- none:      nothing of the prompt (the sampling settings stay; they are not the user's data)
- metadata:  the shape only: per message its role and length in characters, or the prompt's length
- redacted:  the text with e-mail addresses, phone, card, IBAN and national id numbers replaced
             (citadel.residency.redaction); a prompt given as token ids is dropped, keeping its length
- full:      the prompt as sent

A job recorded before residency existed (empty retention) keeps what it had.
"""

from citadel.residency.redaction import redact

PROMPT_KEYS = ("messages", "prompt", "prompt_chars", "prompt_token_count")


def retained_payload(payload: dict, retention: str) -> dict:
    if retention in ("", "full") or not isinstance(payload, dict):
        return payload
    kept = {key: value for key, value in payload.items() if key not in PROMPT_KEYS}
    kept["prompt_retention"] = retention
    if retention == "none":
        return kept
    messages, prompt = payload.get("messages"), payload.get("prompt")
    if retention == "metadata":
        if messages is not None:
            kept["messages"] = [{"role": m.get("role"), "chars": len(str(m.get("content") or ""))} for m in messages]
        elif isinstance(prompt, str):
            kept["prompt_chars"] = len(prompt)
        elif isinstance(prompt, list):
            kept["prompt_token_count"] = len(prompt)
        return kept
    if retention == "redacted":
        if messages is not None:
            kept["messages"] = [{**m, "content": redact(str(m.get("content") or ""))} for m in messages]
        elif isinstance(prompt, str):
            kept["prompt"] = redact(prompt)
        elif isinstance(prompt, list):
            kept["prompt_token_count"] = len(prompt)
        return kept
    raise ValueError(f"unknown prompt retention {retention!r}")
