"""Management API routes under /api/v1/ (included by citadel.api_urls)."""

from django.urls import path

from citadel.batches import apis

urlpatterns = [
    path("batches/", apis.ManagementBatchListApi.as_view(), name="batches"),
    path("batches/<str:batch_id>/", apis.ManagementBatchDetailApi.as_view(), name="batch"),
]
