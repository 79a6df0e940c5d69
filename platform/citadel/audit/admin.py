from django.contrib import admin

from citadel.audit.models import AuditCheckpoint, AuditPurge, AuditRecord, LegalHold


class _ReadOnly(admin.ModelAdmin):
    """The audit log is append-only, also for superusers; Citadel alone writes it."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(AuditRecord)
class AuditRecordAdmin(_ReadOnly):
    list_display = ["sequence", "created_at", "actor_label", "action", "target_type", "target_id", "outcome"]
    list_filter = ["action", "outcome", "actor_type"]
    search_fields = ["actor_label", "target_id", "request_id"]


@admin.register(AuditCheckpoint)
class AuditCheckpointAdmin(_ReadOnly):
    list_display = ["sequence", "created_at", "record_hash", "key_id"]


@admin.register(AuditPurge)
class AuditPurgeAdmin(_ReadOnly):
    list_display = ["created_at", "cutoff", "boundary_sequence", "deleted_count"]


@admin.register(LegalHold)
class LegalHoldAdmin(admin.ModelAdmin):
    """Holds placed or released here are audited through the admin's log (signals.py)."""

    list_display = ["id", "reason", "created_at", "released_at", "actor_id", "target_type", "target_id"]
    readonly_fields = ["created_at", "created_by", "released_by"]

    def has_delete_permission(self, request, obj=None):
        return False  # release a hold instead: its history stays
