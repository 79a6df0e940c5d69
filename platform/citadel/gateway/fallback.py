"""Unknown /v1 paths answer in OpenAI's error shape instead of Django's HTML 404 page."""

from django.views.decorators.csrf import csrf_exempt

from citadel.core.exceptions import NotFound, openai_error_response


@csrf_exempt
def not_found(request):
    return openai_error_response(NotFound(f"Unknown endpoint {request.method} {request.path}.", code="unknown_url"))
