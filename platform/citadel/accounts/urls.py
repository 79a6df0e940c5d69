from django.urls import path

from citadel.accounts import apis

urlpatterns = [
    path("keys/", apis.ApiKeyListCreateApi.as_view(), name="api-keys"),
    path("keys/<str:prefix>/revoke/", apis.ApiKeyRevokeApi.as_view(), name="api-key-revoke"),
]
