from django.urls import include, path, re_path

from citadel.gateway import apis
from citadel.gateway.fallback import not_found
from citadel.gateway.openapi_v1 import openapi_v1_view

urlpatterns = [
    path("openapi.json", openapi_v1_view, name="openai-openapi"),
    path("models", apis.ModelListApi.as_view(), name="openai-models"),
    path("models/<str:model_id>", apis.ModelRetrieveApi.as_view(), name="openai-model"),
    path("chat/completions", apis.ChatCompletionApi.as_view(), name="openai-chat-completions"),
    path("completions", apis.CompletionApi.as_view(), name="openai-completions"),
    path("", include("citadel.finetuning.urls_openai")),
    path("", include("citadel.batches.urls_openai")),
    re_path(r"^.*$", not_found),
]
