from django.contrib import admin

from citadel.accounts.models import ApiKey, Team


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "user", "team", "data_class", "created_at", "expires_at", "revoked_at", "last_used_at"]
    readonly_fields = ["prefix", "digest", "created_at", "last_used_at", "last_used_from"]

    def has_add_permission(self, request):
        return False  # keys are created through the API, console or `citadel keys create`


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    filter_horizontal = ["members"]
