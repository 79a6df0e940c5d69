"""One domain exception, mapped to HTTP by one handler (handlers.py) (OpenAI's error shape under /v1).

Services raise CitadelError subclasses; views never build error responses by hand.
"""

from django.http import JsonResponse


class CitadelError(Exception):
    """A failure the caller should see: an HTTP status, an OpenAI error type, a message."""

    status = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(CitadelError):
    status = 400


class AuthenticationFailed(CitadelError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(CitadelError):
    status = 403
    error_type = "permission_error"


class NotFound(CitadelError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class Conflict(CitadelError):
    status = 409


class RateLimited(CitadelError):
    """Over a quota (citadel.quotas): 429 with Retry-After, the seconds until a retry can succeed."""

    status = 429
    error_type = "requests"  # OpenAI's: "requests" or "tokens" for rate limits, "insufficient_quota" for quotas
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, param: str | None = None, code: str | None = None,
                 error_type: str | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after
        if code == "insufficient_quota":
            self.error_type = "insufficient_quota"
        if error_type is not None:
            self.error_type = error_type


class ServiceUnavailable(CitadelError):
    status = 503
    error_type = "service_unavailable"


class AuditUnavailable(ServiceUnavailable):
    """The audit record could not be written, so the action it describes is refused (fail closed)."""

    code = "audit_unavailable"


class UpstreamError(CitadelError):
    """The worker failed while running the job."""

    status = 500
    error_type = "server_error"


def openai_error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def openai_error_response(error: CitadelError) -> JsonResponse:
    return JsonResponse(
        openai_error_body(error.message, error.error_type, error.param, error.code), status=error.status
    )
