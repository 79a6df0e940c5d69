"""OpenAI routes under /v1: files and fine_tuning/jobs (included by citadel.gateway.urls)."""

from django.urls import path

from citadel.finetuning import apis

urlpatterns = [
    path("files", apis.FileListCreateApi.as_view(), name="openai-files"),
    path("files/<str:file_id>", apis.FileDetailApi.as_view(), name="openai-file"),
    path("files/<str:file_id>/content", apis.FileContentApi.as_view(), name="openai-file-content"),
    path("fine_tuning/jobs", apis.JobListCreateApi.as_view(), name="openai-fine-tuning-jobs"),
    path("fine_tuning/jobs/<str:job_id>", apis.JobDetailApi.as_view(), name="openai-fine-tuning-job"),
    path("fine_tuning/jobs/<str:job_id>/cancel", apis.JobCancelApi.as_view(), name="openai-fine-tuning-job-cancel"),
    path("fine_tuning/jobs/<str:job_id>/events", apis.JobEventsApi.as_view(), name="openai-fine-tuning-job-events"),
    path("fine_tuning/jobs/<str:job_id>/checkpoints", apis.JobCheckpointsApi.as_view(),
         name="openai-fine-tuning-job-checkpoints"),
]
