from django.urls import path

from citadel.jobs import apis

urlpatterns = [
    path("jobs/", apis.JobListApi.as_view(), name="api-jobs"),
    path("jobs/<uuid:job_id>/", apis.JobDetailApi.as_view(), name="api-job"),
]
