from django.urls import path

from citadel.residency import apis

urlpatterns = [
    path("residency/sites/", apis.SiteListCreateApi.as_view(), name="api-residency-sites"),
    path("residency/sites/<str:name>/", apis.SiteDetailApi.as_view(), name="api-residency-site"),
    path("residency/data-classes/", apis.DataClassListCreateApi.as_view(), name="api-residency-data-classes"),
    path("residency/data-classes/<str:name>/", apis.DataClassDetailApi.as_view(), name="api-residency-data-class"),
    path("residency/policies/", apis.PolicyListCreateApi.as_view(), name="api-residency-policies"),
    path("residency/policies/<int:pk>/", apis.PolicyDetailApi.as_view(), name="api-residency-policy"),
    path("residency/dry-run", apis.DryRunApi.as_view(), name="api-residency-dry-run"),
    path("residency/ropa", apis.RopaApi.as_view(), name="api-residency-ropa"),
]
