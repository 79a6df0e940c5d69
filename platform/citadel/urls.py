"""Top-level routes: console, admin, OpenAI API, management API, health."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from citadel.core import views as core_views

urlpatterns = [
    path("healthz", core_views.healthz, name="healthz"),
    path("readyz", core_views.readyz, name="readyz"),
    path("metrics", core_views.metrics, name="metrics"),
    # Every interactive sign-in goes through the console's (lockout, second factor), the admin's too.
    path("admin/login/", RedirectView.as_view(pattern_name="frontend:login", query_string=True)),
    path("admin/", admin.site.urls),
    path("sso/", include("citadel.sso.urls")),
    path("v1/", include("citadel.gateway.urls")),
    path("api/v1/", include("citadel.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("", include("frontend.urls")),
]
