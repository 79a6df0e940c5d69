"""Read-only admin views of fine-tuning rows: they change only through the audited services."""

from django.contrib import admin

from citadel.finetuning.models import File, FineTuningCheckpoint, FineTuningEvent, FineTuningJob


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(File)
class FileAdmin(ReadOnlyAdmin):
    list_display = ["id", "filename", "bytes", "site", "data_class", "team", "created_at", "deleted_at"]


@admin.register(FineTuningJob)
class FineTuningJobAdmin(ReadOnlyAdmin):
    list_display = ["id", "status", "model", "team", "pool", "worker_name", "attempts", "step", "created_at"]
    list_filter = ["status"]


@admin.register(FineTuningEvent)
class FineTuningEventAdmin(ReadOnlyAdmin):
    list_display = ["id", "job", "level", "type", "message", "created_at"]


@admin.register(FineTuningCheckpoint)
class FineTuningCheckpointAdmin(ReadOnlyAdmin):
    list_display = ["id", "job", "step", "path", "created_at"]
