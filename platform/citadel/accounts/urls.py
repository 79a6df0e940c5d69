from django.urls import path

from citadel.accounts import apis

urlpatterns = [
    path("teams/", apis.TeamListCreateApi.as_view(), name="api-teams"),
    path("keys/", apis.ApiKeyListCreateApi.as_view(), name="api-keys"),
    path("keys/<str:prefix>/revoke/", apis.ApiKeyRevokeApi.as_view(), name="api-key-revoke"),
]
