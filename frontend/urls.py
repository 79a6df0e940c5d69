from django.contrib.auth import views as auth_views
from django.urls import path

from frontend import (views, views_account, views_admin_identity, views_audit, views_finetuning, views_people,
                      views_residency, views_usage)

app_name = "frontend"

urlpatterns = [
    path("", views.home, name="home"),
    path("login/", views_account.LoginView.as_view(), name="login"),
    path("login/totp/", views_account.login_totp, name="login-totp"),
    path("account/", views_account.account_page, name="account"),
    path("account/totp/", views_account.account_totp, name="account-totp"),
    path("account/password/", views_account.account_password, name="account-password"),
    path("account/sessions/", views_account.account_sessions, name="account-sessions"),
    path("teams/", views_people.teams_page, name="teams"),
    path("users/", views_people.users_page, name="users"),
    path("keys/", views_people.keys_page, name="keys"),
    path("teams/<str:name>/", views_account.team_page, name="team"),
    path("account/keys/<str:prefix>/quota/", views_admin_identity.key_quota_page, name="key-quota"),
    path("identity/sso-groups/", views_admin_identity.sso_mappings_page, name="identity-sso-mappings"),
    path("identity/login-locks/", views_admin_identity.login_locks_page, name="identity-login-locks"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("models/", views.models_page, name="models"),
    path("playground/", views.playground, name="playground"),
    path("playground/stream", views.PlaygroundStreamApi.as_view(), name="playground-stream"),
    path("residency/", views.residency_dry_run, name="residency"),
    path("fine-tuning/", views_finetuning.jobs_page, name="finetuning"),
    path("fine-tuning/datasets/", views_finetuning.datasets_page, name="finetuning-datasets"),
    path("fine-tuning/datasets/upload", views_finetuning.dataset_upload, name="finetuning-upload"),
    path("fine-tuning/jobs/new/", views_finetuning.job_new, name="finetuning-job-new"),
    path("fine-tuning/jobs/<str:job_id>/", views_finetuning.job_page, name="finetuning-job"),
    path("fine-tuning/jobs/<str:job_id>/live", views_finetuning.job_live, name="finetuning-job-live"),
    path("fine-tuning/jobs/<str:job_id>/cancel", views_finetuning.job_cancel, name="finetuning-job-cancel"),
    path("usage/", views_usage.usage_page, name="usage"),
    path("usage/export.csv", views_usage.usage_export, name="usage-export"),
    path("audit/", views_audit.audit_page, name="audit"),
    path("audit/records/<int:sequence>/", views_audit.audit_record_page, name="audit-record"),
    path("audit/verify/", views_audit.audit_verify, name="audit-verify"),
    path("audit/export/", views_audit.audit_download, name="audit-export"),
    path("residency/admin/", views_residency.residency_admin_page, name="residency-admin"),
    path("residency/policies/new/", views_residency.policy_new, name="residency-policy-new"),
    path("residency/policies/<int:pk>/edit/", views_residency.policy_edit, name="residency-policy-edit"),
    path("residency/policies/<int:pk>/delete/", views_residency.policy_delete, name="residency-policy-delete"),
]
