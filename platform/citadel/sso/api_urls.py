from django.urls import path

from citadel.sso import apis

urlpatterns = [
    path("sso/group-mappings/", apis.GroupMappingListCreateApi.as_view(), name="api-sso-group-mappings"),
    path("sso/group-mappings/<int:pk>/", apis.GroupMappingDetailApi.as_view(), name="api-sso-group-mapping"),
]
