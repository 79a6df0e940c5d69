from django.urls import path

from citadel.accounts import apis

urlpatterns = [
    path("me/", apis.MeApi.as_view(), name="api-me"),
    path("me/totp/", apis.MeTotpApi.as_view(), name="api-me-totp"),
    path("me/totp/confirm/", apis.MeTotpConfirmApi.as_view(), name="api-me-totp-confirm"),
    path("users/<str:username>/totp/", apis.UserTotpApi.as_view(), name="api-user-totp"),
    path("teams/", apis.TeamListCreateApi.as_view(), name="api-teams"),
    path("teams/<str:name>/", apis.TeamDetailApi.as_view(), name="api-team"),
    path("teams/<str:name>/members/", apis.MembershipListCreateApi.as_view(), name="api-team-members"),
    path("teams/<str:name>/members/<str:username>/", apis.MembershipDetailApi.as_view(), name="api-team-member"),
    path("keys/", apis.ApiKeyListCreateApi.as_view(), name="api-keys"),
    path("keys/<str:prefix>/", apis.ApiKeyDetailApi.as_view(), name="api-key"),
    path("keys/<str:prefix>/revoke/", apis.ApiKeyRevokeApi.as_view(), name="api-key-revoke"),
    path("login-locks/", apis.LoginLockListApi.as_view(), name="api-login-locks"),
]
