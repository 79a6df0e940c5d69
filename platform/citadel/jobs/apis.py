"""Management API for inference jobs: a user sees their teams' jobs and their own, platform admins all."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts.permissions import object_get, scope
from citadel.jobs.models import InferenceJob


class JobOutput(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    pool = serializers.CharField(source="pool.name", default=None, allow_null=True)

    class Meta:
        model = InferenceJob
        fields = ["id", "kind", "status", "model", "pool", "worker_name", "request_id", "stream", "finish_reason",
                  "prompt_tokens", "completion_tokens", "error_code", "error_message", "created_at", "started_at",
                  "finished_at"]


class JobListApi(APIView):
    @extend_schema(responses=JobOutput(many=True))
    def get(self, request):
        jobs = scope(request.user, InferenceJob.objects.select_related("model", "pool"))
        return Response(JobOutput(jobs[:200], many=True).data)


class JobDetailApi(APIView):
    @extend_schema(responses=JobOutput)
    def get(self, request, job_id):
        job = object_get(request.user, InferenceJob.objects.select_related("model", "pool"), what="job", id=job_id)
        return Response(JobOutput(job).data)
