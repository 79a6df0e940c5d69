"""Management API routes (/api/v1/fine-tuning/...); ids are the same OpenAI ids as under /v1."""

from django.urls import path

from citadel.finetuning import apis

urlpatterns = [
    path("fine-tuning/files/", apis.ManagementFileListApi.as_view(), name="api-finetuning-files"),
    path("fine-tuning/files/<str:file_id>/", apis.ManagementFileDetailApi.as_view(), name="api-finetuning-file"),
    path("fine-tuning/files/<str:file_id>/content/", apis.ManagementFileContentApi.as_view(),
         name="api-finetuning-file-content"),
    path("fine-tuning/jobs/", apis.ManagementJobListApi.as_view(), name="api-finetuning-jobs"),
    path("fine-tuning/jobs/<str:job_id>/", apis.ManagementJobDetailApi.as_view(), name="api-finetuning-job"),
    path("fine-tuning/jobs/<str:job_id>/cancel/", apis.ManagementJobCancelApi.as_view(),
         name="api-finetuning-job-cancel"),
    path("fine-tuning/jobs/<str:job_id>/events/", apis.ManagementJobEventsApi.as_view(),
         name="api-finetuning-job-events"),
    path("fine-tuning/jobs/<str:job_id>/checkpoints/", apis.ManagementJobCheckpointsApi.as_view(),
         name="api-finetuning-job-checkpoints"),
    path("fine-tuning/jobs/<str:job_id>/metrics/", apis.ManagementJobMetricsApi.as_view(),
         name="api-finetuning-job-metrics"),
]
