"""The management API (/api/v1/): one include per app."""

from django.urls import include, path

urlpatterns = [
    path("", include("citadel.registry.urls")),
    path("", include("citadel.accounts.urls")),
    path("", include("citadel.quotas.urls")),
    path("", include("citadel.audit.urls")),
    path("", include("citadel.sso.api_urls")),
    path("", include("citadel.jobs.urls")),
    path("", include("citadel.residency.urls")),
    path("", include("citadel.finetuning.urls")),
    path("", include("citadel.batches.urls")),
    path("", include("citadel.usage.urls")),
]
