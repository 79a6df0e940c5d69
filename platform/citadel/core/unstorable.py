"""Refuse text PostgreSQL cannot hold (NUL, lone UTF-16 surrogates) at the door, naming where it is.

PostgreSQL's text and jsonb cannot store the NUL character, and UTF-8 cannot encode a lone
surrogate (JSON lets a client send both: "\\u0000", "\\ud800"). Left alone, such a value reaches
the database wherever a request's text is stored or looked up, and the request fails with a server
error (API fuzzing found it in several apps). One middleware answers 400 instead, naming the field
(OpenAI's error shape under /v1, the management API's elsewhere), before any view runs.

It is cheap on ordinary requests: the path, the query string and JSON or form bodies are scanned
as bytes, and a JSON body is parsed only when the scan finds an escape worth a closer look.
Multipart uploads are left to their views: a file's bytes may hold anything.
"""

import json
import re

from django.http import HttpResponse, JsonResponse

from citadel.core.exceptions import openai_error_body

_JSON_SUSPECT = re.compile(rb"\\u0000|\\u[dD][89a-fA-F]|\x00")
_MESSAGE = ("contains a character that cannot be stored: the NUL character (\\u0000) or a lone UTF-16 surrogate "
            "(\\ud800-\\udfff). Remove it, or send the text as valid UTF-8.")


def _bad_text(value: str) -> bool:
    if "\x00" in value:
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _first_bad(value, where: str = "") -> str | None:
    """The path (like `messages[0].content`) of the first unstorable string in a parsed JSON value."""
    if isinstance(value, str):
        return where or "body" if _bad_text(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            if _bad_text(str(key)):
                return name
            found = _first_bad(item, name)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_bad(item, f"{where}[{index}]")
            if found:
                return found
    return None


def _query_field(request) -> str | None:
    if "%00" not in request.META.get("QUERY_STRING", ""):
        return None
    for key, values in request.GET.lists():
        if "\x00" in key or any("\x00" in v for v in values):
            return key.replace("\x00", "")
    return None


def _body_field(request) -> str | None:
    content_type = request.META.get("CONTENT_TYPE", "")
    if content_type.startswith("application/json"):
        body = request.body
        if not _JSON_SUSPECT.search(body):
            return None
        try:
            return _first_bad(json.loads(body))
        except (ValueError, RecursionError):
            return None  # not JSON: the view's parser says so
    if content_type.startswith("application/x-www-form-urlencoded") and b"%00" in request.body:
        for key, values in request.POST.lists():
            if "\x00" in key or any("\x00" in v for v in values):
                return key.replace("\x00", "")
    return None


def _refusal(request, field: str):
    message = f"{field} {_MESSAGE}"
    if request.path.startswith("/v1/"):
        return JsonResponse(openai_error_body(message, "invalid_request_error", field, "invalid_value"), status=400)
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": message, "code": "invalid_value", "field": field}, status=400)
    return HttpResponse(f"{message}\n", status=400, content_type="text/plain; charset=utf-8")


class UnstorableTextMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if "\x00" in request.path:
            return _refusal(request, "path")
        field = _query_field(request) or _body_field(request)
        if field is not None:
            return _refusal(request, field)
        return self.get_response(request)
