"""Request ids for logs, audit and replies; 503 for console pages whose action could not be audited."""

import re
import uuid

from django.http import HttpResponse

from citadel.core.exceptions import ServiceUnavailable

_VALID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")


class RequestIdMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.headers.get("X-Request-ID", "")
        request.request_id = incoming if _VALID.match(incoming) else f"req_{uuid.uuid4().hex}"
        response = self.get_response(request)
        response["X-Request-ID"] = request.request_id
        return response


class ServiceUnavailableMiddleware:
    """Console (non-API) views that raise ServiceUnavailable, e.g. AuditUnavailable from a login whose
    audit record cannot be written, answer 503 instead of 500 (the API's handler does the same).

    A session changed by the refused request (a login) is flushed, so nothing the request did
    survives in the browser: failing closed includes not being logged in.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, ServiceUnavailable):
            return None
        session = getattr(request, "session", None)
        if session is not None and session.modified:
            session.flush()
        response = HttpResponse(f"{exception}\n", status=503, content_type="text/plain; charset=utf-8")
        response["Retry-After"] = "30"
        return response
