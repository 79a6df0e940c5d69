from django.urls import path

from citadel.quotas import apis

urlpatterns = [
    path("teams/<str:name>/quota/", apis.TeamQuotaApi.as_view(), name="api-team-quota"),
    path("keys/<str:prefix>/quota/", apis.KeyQuotaApi.as_view(), name="api-key-quota"),
]
