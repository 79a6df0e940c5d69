from django.urls import path

from citadel.audit import apis

urlpatterns = [
    path("audit/records/", apis.AuditRecordListApi.as_view(), name="api-audit-records"),
]
