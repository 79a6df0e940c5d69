"""OpenAI routes under /v1: batches (included by citadel.gateway.urls)."""

from django.urls import path

from citadel.batches import apis

urlpatterns = [
    path("batches", apis.BatchListCreateApi.as_view(), name="openai-batches"),
    path("batches/<str:batch_id>", apis.BatchDetailApi.as_view(), name="openai-batch"),
    path("batches/<str:batch_id>/cancel", apis.BatchCancelApi.as_view(), name="openai-batch-cancel"),
]
