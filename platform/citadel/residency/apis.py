"""Management API for residency: sites, data classes and policies (platform administrators change them,
auditors read them; an auditor sees the policies of their teams and the ones for every team), the dry
run (anyone who may use models) and the record of processing activities (administrators, auditors)."""

from django.db.models import Q
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import renderers, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts.permissions import OVERSIGHT_ROLES, USE_ROLES, is_platform_admin, team_ids
from citadel.audit.services import Actor
from citadel.core.exceptions import NotFound
from citadel.registry.selectors import model_get
from citadel.residency import selectors, services
from citadel.residency.models import RETENTION_DAYS_MAX, DataClass, Policy, Site


class SiteSerializer(serializers.ModelSerializer):
    class Meta:
        model = Site
        fields = ["name", "region", "jurisdiction", "storage_path", "description", "created_at"]
        read_only_fields = ["created_at"]
        extra_kwargs = {"name": {"validators": []}}  # uniqueness is the service's, with a clear error


class DataClassSerializer(serializers.ModelSerializer):
    class Meta:
        model = DataClass
        fields = ["name", "rank", "description", "audit_retention_days", "builtin", "created_at"]
        read_only_fields = ["builtin", "created_at"]
        extra_kwargs = {"name": {"validators": []}, "audit_retention_days": {"max_value": RETENTION_DAYS_MAX}}


class PolicyOutput(serializers.ModelSerializer):
    team = serializers.CharField(source="team.name", default=None, allow_null=True)
    data_class = serializers.CharField(source="data_class.name")
    processing_sites = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)
    storage_sites = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = Policy
        fields = ["id", "team", "data_class", "processing_sites", "processing_jurisdictions", "storage_sites",
                  "storage_jurisdictions", "prompt_retention", "retention_days", "fine_tuning_allowed",
                  "description", "created_at", "updated_at"]


class PolicyInput(serializers.Serializer):
    team = serializers.CharField(required=False, allow_null=True, default=None,
                                 help_text="The team; empty for keys that belong to no team.")
    data_class = serializers.CharField()
    processing_sites = serializers.ListField(child=serializers.CharField(), required=False)
    processing_jurisdictions = serializers.ListField(child=serializers.CharField(), required=False)
    storage_sites = serializers.ListField(child=serializers.CharField(), required=False)
    storage_jurisdictions = serializers.ListField(child=serializers.CharField(), required=False)
    prompt_retention = serializers.ChoiceField(choices=Policy.Retention.choices, required=False)
    retention_days = serializers.IntegerField(required=False, allow_null=True, min_value=1,
                                              max_value=RETENTION_DAYS_MAX)
    fine_tuning_allowed = serializers.BooleanField(required=False)
    description = serializers.CharField(required=False, allow_blank=True)


def _sites(names: list[str], param: str) -> list[Site]:
    sites = list(Site.objects.filter(name__in=names))
    missing = sorted(set(names) - {s.name for s in sites})
    if missing:
        raise NotFound(f"No site named {', '.join(missing)}.", param=param)
    return sites


def _policy_fields(data: dict) -> dict:
    from citadel.accounts.models import Team

    fields = dict(data)
    if "team" in fields:
        name = fields["team"]
        fields["team"] = None
        if name:
            fields["team"] = Team.objects.filter(name=name).first()
            if fields["team"] is None:
                raise NotFound(f"No team named '{name}'.", param="team")
    if "data_class" in fields:
        fields["data_class"] = services.data_class_get(name=fields["data_class"])
    for name in ("processing_sites", "storage_sites"):
        if name in fields:
            fields[name] = _sites(fields[name], name)
    return fields


def _get(model, param: str, **lookup):
    row = model.objects.filter(**lookup).first()
    if row is None:
        raise NotFound(f"No {model._meta.verbose_name} {next(iter(lookup.values()))!r}.", param=param)
    return row


class SiteListCreateApi(APIView):
    read_roles, write_roles = OVERSIGHT_ROLES, frozenset()  # citadel.accounts.permissions

    @extend_schema(responses=SiteSerializer(many=True))
    def get(self, request):
        return Response(SiteSerializer(Site.objects.all(), many=True).data)

    @extend_schema(request=SiteSerializer, responses={201: SiteSerializer})
    def post(self, request):
        data = SiteSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        site = services.site_create(actor=Actor.for_request(request), request=request, **data.validated_data)
        return Response(SiteSerializer(site).data, status=status.HTTP_201_CREATED)


class SiteDetailApi(APIView):
    read_roles, write_roles = OVERSIGHT_ROLES, frozenset()  # citadel.accounts.permissions

    @extend_schema(responses=SiteSerializer)
    def get(self, request, name: str):
        return Response(SiteSerializer(_get(Site, "name", name=name)).data)

    @extend_schema(request=SiteSerializer, responses=SiteSerializer)
    def patch(self, request, name: str):
        site = _get(Site, "name", name=name)
        data = SiteSerializer(site, data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        site = services.site_update(site=site, actor=Actor.for_request(request), request=request,
                                    **data.validated_data)
        return Response(SiteSerializer(site).data)

    @extend_schema(responses={204: None})
    def delete(self, request, name: str):
        services.site_delete(site=_get(Site, "name", name=name), actor=Actor.for_request(request), request=request)
        return Response(status=status.HTTP_204_NO_CONTENT)


class DataClassListCreateApi(APIView):
    read_roles, write_roles = OVERSIGHT_ROLES, frozenset()  # citadel.accounts.permissions

    @extend_schema(responses=DataClassSerializer(many=True))
    def get(self, request):
        return Response(DataClassSerializer(DataClass.objects.all(), many=True).data)

    @extend_schema(request=DataClassSerializer, responses={201: DataClassSerializer})
    def post(self, request):
        data = DataClassSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        data_class = services.data_class_create(actor=Actor.for_request(request), request=request,
                                                **data.validated_data)
        return Response(DataClassSerializer(data_class).data, status=status.HTTP_201_CREATED)


class DataClassDetailApi(APIView):
    read_roles, write_roles = OVERSIGHT_ROLES, frozenset()  # citadel.accounts.permissions

    @extend_schema(responses=DataClassSerializer)
    def get(self, request, name: str):
        return Response(DataClassSerializer(_get(DataClass, "name", name=name)).data)

    @extend_schema(request=DataClassSerializer, responses=DataClassSerializer)
    def patch(self, request, name: str):
        data_class = _get(DataClass, "name", name=name)
        data = DataClassSerializer(data_class, data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        data_class = services.data_class_update(data_class=data_class, actor=Actor.for_request(request),
                                                request=request, **data.validated_data)
        return Response(DataClassSerializer(data_class).data)

    @extend_schema(responses={204: None})
    def delete(self, request, name: str):
        services.data_class_delete(data_class=_get(DataClass, "name", name=name), actor=Actor.for_request(request),
                                   request=request)
        return Response(status=status.HTTP_204_NO_CONTENT)


def _policies(user=None):
    policies = Policy.objects.select_related("team", "data_class").prefetch_related("processing_sites",
                                                                                    "storage_sites")
    if user is None or is_platform_admin(user):
        return policies
    return policies.filter(Q(team__isnull=True) | Q(team__in=team_ids(user)))


class PolicyListCreateApi(APIView):
    read_roles, write_roles = OVERSIGHT_ROLES, frozenset()  # citadel.accounts.permissions

    @extend_schema(responses=PolicyOutput(many=True))
    def get(self, request):
        return Response(PolicyOutput(_policies(request.user), many=True).data)

    @extend_schema(request=PolicyInput, responses={201: PolicyOutput})
    def post(self, request):
        data = PolicyInput(data=request.data)
        data.is_valid(raise_exception=True)
        policy = services.policy_create(actor=Actor.for_request(request), request=request,
                                        **_policy_fields(data.validated_data))
        return Response(PolicyOutput(_policies().get(pk=policy.pk)).data, status=status.HTTP_201_CREATED)


class PolicyDetailApi(APIView):
    read_roles, write_roles = OVERSIGHT_ROLES, frozenset()  # citadel.accounts.permissions

    @extend_schema(responses=PolicyOutput)
    def get(self, request, pk: int):
        policy = _policies(request.user).filter(pk=pk).first()
        if policy is None:
            raise NotFound(f"No policy {pk!r}.", param="id")
        return Response(PolicyOutput(policy).data)

    @extend_schema(request=PolicyInput, responses=PolicyOutput)
    def patch(self, request, pk: int):
        policy = _get(Policy, "id", pk=pk)
        data = PolicyInput(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        policy = services.policy_update(policy=policy, actor=Actor.for_request(request), request=request,
                                        **_policy_fields(data.validated_data))
        return Response(PolicyOutput(_policies().get(pk=policy.pk)).data)

    @extend_schema(responses={204: None})
    def delete(self, request, pk: int):
        services.policy_delete(policy=_get(Policy, "id", pk=pk), actor=Actor.for_request(request), request=request)
        return Response(status=status.HTTP_204_NO_CONTENT)


class DryRunApi(APIView):
    """Would this request be allowed, and where would it run? Nothing is dispatched or recorded."""

    write_roles = USE_ROLES

    class DryRunInput(serializers.Serializer):
        model = serializers.CharField()
        data_class = serializers.CharField(required=False, allow_null=True, default=None,
                                           help_text="Raise the key's data class (never lower it).")
        purpose = serializers.ChoiceField(choices=services.PURPOSES, default="inference")

    class DryRunOutput(serializers.Serializer):
        allowed = serializers.BooleanField()
        pool = serializers.CharField(allow_null=True)
        site = serializers.CharField(allow_null=True)
        jurisdiction = serializers.CharField(allow_null=True)
        reason = serializers.CharField()
        team = serializers.CharField(allow_null=True)
        data_class = serializers.CharField()
        policy = serializers.IntegerField(allow_null=True)
        allowed_pools = serializers.ListField(child=serializers.CharField())
        storage_sites = serializers.ListField(child=serializers.CharField())
        storage_site = serializers.CharField(allow_null=True, help_text="Where a file would be stored.")
        prompt_retention = serializers.CharField(allow_null=True)

    @extend_schema(request=DryRunInput, responses=DryRunOutput)
    def post(self, request):
        data = self.DryRunInput(data=request.data)
        data.is_valid(raise_exception=True)
        return Response(services.dry_run(request=request, model=model_get(name=data.validated_data["model"]),
                                         requested_class=data.validated_data["data_class"],
                                         purpose=data.validated_data["purpose"]))


class CsvRenderer(renderers.BaseRenderer):
    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return data if isinstance(data, str) else str(data)


class RopaApi(APIView):
    """The record of processing activities, from policies and usage: JSON, or CSV with ?format=csv."""

    read_roles, write_roles = OVERSIGHT_ROLES, frozenset()  # citadel.accounts.permissions
    renderer_classes = [renderers.JSONRenderer, renderers.BrowsableAPIRenderer, CsvRenderer]

    @extend_schema(responses={(200, "application/json"): OpenApiTypes.OBJECT, (200, "text/csv"): OpenApiTypes.STR})
    def get(self, request):
        record = selectors.ropa()
        if request.accepted_renderer.format == "csv":
            response = Response(selectors.ropa_csv(record), content_type="text/csv; charset=utf-8")
            response["Content-Disposition"] = 'attachment; filename="ropa.csv"'
            return response
        return Response(record)
