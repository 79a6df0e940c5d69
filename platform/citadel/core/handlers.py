"""The one exception handler: domain and DRF errors to HTTP, OpenAI's error shape under /v1."""

import math

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.db import InterfaceError, OperationalError
from django.http import Http404
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from citadel.core.exceptions import (
    AuthenticationFailed,
    CitadelError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
    openai_error_body,
)


def _drf_to_citadel(exc: Exception) -> CitadelError | None:
    if isinstance(exc, CitadelError):
        return exc
    if isinstance(exc, OperationalError | InterfaceError):  # PostgreSQL restarting or unreachable
        error = ServiceUnavailable("The database is unavailable; try again shortly.", code="database_unavailable")
        error.retry_after = 5
        return error
    if isinstance(exc, drf_exceptions.ParseError):
        return InvalidRequest(f"The request body is not valid JSON: {exc.detail}", code="invalid_json")
    if isinstance(exc, drf_exceptions.ValidationError):
        param, message = _first_validation_error(exc.detail)
        return InvalidRequest(message, param=param, code="invalid_value")
    if isinstance(exc, drf_exceptions.NotAuthenticated | drf_exceptions.AuthenticationFailed):
        return AuthenticationFailed(str(exc.detail))
    if isinstance(exc, drf_exceptions.PermissionDenied | DjangoPermissionDenied):
        return PermissionDenied(str(getattr(exc, "detail", exc) or "You do not have permission."))
    if isinstance(exc, drf_exceptions.NotFound | Http404):
        return NotFound(str(getattr(exc, "detail", exc) or "Not found."))
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        error = InvalidRequest(str(exc.detail), code="method_not_allowed")
        error.status = 405
        return error
    if isinstance(exc, drf_exceptions.UnsupportedMediaType):
        error = InvalidRequest(f"{exc.detail} Send Content-Type: application/json.", code="unsupported_media_type")
        error.status = 415
        return error
    return None


def _first_validation_error(detail, prefix: str = "") -> tuple[str | None, str]:
    """Flatten DRF's nested errors to (field path like `messages[0].role`, message) of the first one."""
    if isinstance(detail, dict) and detail:
        key, value = next(iter(detail.items()))
        if isinstance(key, int):  # a list serializer's errors, keyed by item index
            return _first_validation_error(value, f"{prefix}[{key}]")
        name = "" if key == "non_field_errors" else str(key)
        return _first_validation_error(value, f"{prefix}.{name}" if prefix and name else (name or prefix))
    if isinstance(detail, list) and detail:
        for index, item in enumerate(detail):
            if isinstance(item, dict) and item:
                return _first_validation_error(item, f"{prefix}[{index}]")
            if item and not isinstance(item, dict):
                return _first_validation_error(item, prefix)
    return (prefix or None), (f"{prefix}: {detail}" if prefix else str(detail))


def api_exception_handler(exc, context):
    """DRF's handler: OpenAI's shape under /v1, DRF's `detail` shape elsewhere."""
    request = context.get("request")
    error = _drf_to_citadel(exc)
    if error is None:
        return drf_exception_handler(exc, context)
    if request is not None and request.path.startswith("/v1/"):
        response = Response(
            openai_error_body(error.message, error.error_type, error.param, error.code), status=error.status
        )
    else:
        body = {"detail": error.message, "code": error.code or error.error_type}
        if error.param:
            body["field"] = error.param
        response = Response(body, status=error.status)
    if error.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="citadel"'
    if getattr(error, "retry_after", None) is not None:
        response["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return response
