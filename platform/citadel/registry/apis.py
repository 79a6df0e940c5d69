"""Management API for the registry: thin views over services and selectors."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts.permissions import REGISTRY_ROLES
from citadel.audit.services import Actor
from citadel.core.exceptions import NotFound
from citadel.registry import services
from citadel.registry.models import Deployment, Model, Worker, WorkerPool
from citadel.registry.selectors import model_get


class ModelOutput(serializers.ModelSerializer):
    teams = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = Model
        fields = ["name", "path", "family", "description", "teams", "created_at"]


class PoolOutput(serializers.ModelSerializer):
    site = serializers.CharField(source="site.name")
    jurisdiction = serializers.CharField(source="site.jurisdiction")

    class Meta:
        model = WorkerPool
        fields = ["name", "site", "jurisdiction", "description", "queue", "created_at"]


class DeploymentOutput(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    pool = serializers.CharField(source="pool.name")

    class Meta:
        model = Deployment
        fields = ["id", "model", "pool", "status", "engine_settings", "created_at"]


class WorkerOutput(serializers.ModelSerializer):
    pool = serializers.CharField(source="pool.name")

    class Meta:
        model = Worker
        fields = ["name", "pool", "hostname", "pid", "status", "started_at", "last_heartbeat", "loaded_models"]


class ModelListCreateApi(APIView):
    write_roles = REGISTRY_ROLES  # operators and platform administrators (citadel.accounts.permissions)

    class ModelRegisterInput(serializers.Serializer):
        name = serializers.CharField(max_length=100)
        path = serializers.CharField(max_length=500)
        description = serializers.CharField(required=False, allow_blank=True, default="")

    @extend_schema(responses=ModelOutput(many=True))
    def get(self, request):
        return Response(ModelOutput(Model.objects.prefetch_related("teams"), many=True).data)

    @extend_schema(request=ModelRegisterInput, responses={201: ModelOutput})
    def post(self, request):
        data = self.ModelRegisterInput(data=request.data)
        data.is_valid(raise_exception=True)
        model = services.model_register(actor=Actor.for_request(request), request=request, **data.validated_data)
        return Response(ModelOutput(model).data, status=status.HTTP_201_CREATED)


class ModelTeamsApi(APIView):
    """PUT the teams that use a model; deployments must then suit their residency policies."""

    write_roles = REGISTRY_ROLES  # operators and platform administrators (citadel.accounts.permissions)

    class ModelTeamsInput(serializers.Serializer):
        teams = serializers.ListField(child=serializers.CharField(), allow_empty=True)

    @extend_schema(request=ModelTeamsInput, responses=ModelOutput)
    def put(self, request, name: str):
        from citadel.accounts.models import Team

        data = self.ModelTeamsInput(data=request.data)
        data.is_valid(raise_exception=True)
        names = data.validated_data["teams"]
        teams = list(Team.objects.filter(name__in=names))
        missing = sorted(set(names) - {t.name for t in teams})
        if missing:
            raise NotFound(f"No team named {', '.join(missing)}.", param="teams")
        model = services.model_teams_set(model=model_get(name=name), teams=teams, actor=Actor.for_request(request),
                                         request=request)
        return Response(ModelOutput(model).data)


class PoolListCreateApi(APIView):
    write_roles = REGISTRY_ROLES  # operators and platform administrators (citadel.accounts.permissions)

    class PoolCreateInput(serializers.Serializer):
        name = serializers.CharField(max_length=64)
        site = serializers.CharField(max_length=100, default="local",
                                     help_text="The site's name; an unknown one is created with jurisdiction "
                                               "'unspecified'.")
        description = serializers.CharField(required=False, allow_blank=True, default="")

    @extend_schema(responses=PoolOutput(many=True))
    def get(self, request):
        return Response(PoolOutput(WorkerPool.objects.select_related("site"), many=True).data)

    @extend_schema(request=PoolCreateInput, responses={201: PoolOutput})
    def post(self, request):
        data = self.PoolCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        pool = services.pool_create(actor=Actor.for_request(request), request=request, **data.validated_data)
        return Response(PoolOutput(pool).data, status=status.HTTP_201_CREATED)


class DeploymentListCreateApi(APIView):
    write_roles = REGISTRY_ROLES  # operators and platform administrators (citadel.accounts.permissions)

    class DeploymentCreateInput(serializers.Serializer):
        model = serializers.CharField()
        pool = serializers.CharField()
        engine_settings = serializers.DictField(required=False, default=dict)

    @extend_schema(responses=DeploymentOutput(many=True))
    def get(self, request):
        return Response(DeploymentOutput(Deployment.objects.select_related("model", "pool"), many=True).data)

    @extend_schema(request=DeploymentCreateInput, responses={201: DeploymentOutput})
    def post(self, request):
        data = self.DeploymentCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        model = model_get(name=data.validated_data["model"])
        pool = WorkerPool.objects.filter(name=data.validated_data["pool"]).first()
        if pool is None:
            raise NotFound(f"No worker pool named '{data.validated_data['pool']}'.", param="pool")
        deployment = services.deployment_create(model=model, pool=pool, actor=Actor.for_request(request),
                                                request=request,
                                                engine_settings=data.validated_data["engine_settings"])
        return Response(DeploymentOutput(deployment).data, status=status.HTTP_201_CREATED)


class DeploymentRetireApi(APIView):
    write_roles = REGISTRY_ROLES  # operators and platform administrators (citadel.accounts.permissions)

    @extend_schema(request=None, responses=DeploymentOutput)
    def post(self, request, pk: int):
        deployment = Deployment.objects.filter(pk=pk).first()
        if deployment is None:
            raise NotFound(f"No deployment with id {pk}.")
        deployment = services.deployment_retire(deployment=deployment, actor=Actor.for_request(request),
                                                request=request)
        return Response(DeploymentOutput(deployment).data)


class WorkerListApi(APIView):
    @extend_schema(responses=WorkerOutput(many=True))
    def get(self, request):
        return Response(WorkerOutput(Worker.objects.select_related("pool"), many=True).data)
