"""Management API routes under /api/v1/ (included by citadel.api_urls)."""

from django.urls import path

from citadel.usage import apis

urlpatterns = [
    path("usage/", apis.UsageApi.as_view(), name="usage"),
    path("usage/export.csv", apis.UsageExportApi.as_view(), name="usage-export"),
]
