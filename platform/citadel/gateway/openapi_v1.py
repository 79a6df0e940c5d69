"""GET /v1/openapi.json: the OpenAPI document of the /v1 routes Citadel serves (openapi_v1.yaml beside it).

drf-spectacular documents the management API (/api/schema/); the /v1 views are left out of it
(they follow OpenAI's reference, not DRF serializers' shapes), so this hand-written document
describes them as Citadel serves them. tests/fuzz checks the running server against it.
"""

from functools import cache
from pathlib import Path

import yaml
from django.http import JsonResponse
from django.views.decorators.http import require_GET

DOCUMENT = Path(__file__).with_name("openapi_v1.yaml")


@cache
def openapi_v1() -> dict:
    return yaml.safe_load(DOCUMENT.read_text())


@require_GET
def openapi_v1_view(request):
    return JsonResponse(openapi_v1())
