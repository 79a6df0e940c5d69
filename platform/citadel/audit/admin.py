from django.contrib import admin

from citadel.audit.models import AuditRecord


@admin.register(AuditRecord)
class AuditRecordAdmin(admin.ModelAdmin):
    """Read-only: the audit log is append-only, also for superusers."""

    list_display = ["sequence", "created_at", "actor_label", "action", "target_type", "target_id", "outcome"]
    list_filter = ["action", "outcome", "actor_type"]
    search_fields = ["actor_label", "target_id", "request_id"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
