"""503 instead of 500 for any request that failed because PostgreSQL is down or restarting.

The API's exception handler (citadel.core.handlers) already answers 503 `database_unavailable` for
errors raised inside its views. Console pages, and any request whose *middleware* reads the
database (the session, request.user in the MFA and auditor middlewares), used to answer Django's
500. Such errors are turned into responses by Django's per-middleware exception wrapper before an
outer middleware could see them, so this works in two parts:

* a `got_request_exception` receiver marks the request when the exception being handled is a
  database connection error (OperationalError or InterfaceError);
* DatabaseUnavailableMiddleware, outside every middleware that may read the database (inside
  the security, CSP and static-file ones, so its page keeps their headers), replaces the response of a marked
  request with a 503 and Retry-After: a static HTML page for the console, the API's JSON shapes
  for /api/ and /v1/.

Rendering the page touches nothing that needs the database: a template rendered without a request
(so no context processors: no request.user, no messages), no session. Nothing is kept between
requests, so pages serve again by themselves once PostgreSQL is back (Django opens a new
connection per request, or replaces one that errored when CONN_MAX_AGE keeps them).
"""

import sys

from django.core.signals import got_request_exception
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse, JsonResponse
from django.template.loader import render_to_string

from citadel.core.exceptions import openai_error_body

RETRY_AFTER_SECONDS = 5
MESSAGE = "The database is unavailable; try again shortly."
_MARK = "_citadel_database_unavailable"


def _mark_database_errors(sender, request=None, **kwargs) -> None:
    """got_request_exception is sent while the exception is being handled: sys.exc_info() is it."""
    error = sys.exc_info()[1]
    if request is not None and isinstance(error, OperationalError | InterfaceError):
        setattr(request, _MARK, True)


got_request_exception.connect(_mark_database_errors, dispatch_uid="citadel-database-unavailable")


def database_unavailable_response(path: str) -> HttpResponse:
    """The 503 for a request to `path`: OpenAI's error shape under /v1/, the management API's under
    /api/, a plain HTML page for the console."""
    if path.startswith("/v1/"):
        response = JsonResponse(openai_error_body(MESSAGE, "service_unavailable", None, "database_unavailable"),
                                status=503)
    elif path.startswith("/api/"):
        response = JsonResponse({"detail": MESSAGE, "code": "database_unavailable"}, status=503)
    else:
        html = render_to_string("frontend/database_unavailable.html", {"retry_after": RETRY_AFTER_SECONDS})
        response = HttpResponse(html, status=503, content_type="text/html; charset=utf-8")
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    response["Cache-Control"] = "no-store"
    return response


class DatabaseUnavailableMiddleware:
    """Around every middleware that reads the database: a request that failed on the database answers 503, never 500."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if getattr(request, _MARK, False) and response.status_code >= 500:
            return database_unavailable_response(request.path)
        return response
