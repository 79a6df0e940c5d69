from django.urls import path

from citadel.registry import apis

urlpatterns = [
    path("models/", apis.ModelListCreateApi.as_view(), name="api-models"),
    path("models/<str:name>/teams/", apis.ModelTeamsApi.as_view(), name="api-model-teams"),
    path("pools/", apis.PoolListCreateApi.as_view(), name="api-pools"),
    path("deployments/", apis.DeploymentListCreateApi.as_view(), name="api-deployments"),
    path("deployments/<int:pk>/retire/", apis.DeploymentRetireApi.as_view(), name="api-deployment-retire"),
    path("workers/", apis.WorkerListApi.as_view(), name="api-workers"),
]
