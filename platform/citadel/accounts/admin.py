from django.contrib import admin

from citadel.accounts.models import ApiKey, LoginLock, Membership, Team


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "user", "team", "data_class", "created_at", "expires_at", "revoked_at", "last_used_at"]
    readonly_fields = ["prefix", "digest", "created_at", "last_used_at", "last_used_from"]

    def has_add_permission(self, request):
        return False  # keys are created through the API, console or `citadel keys create`


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    inlines = [MembershipInline]


@admin.register(LoginLock)
class LoginLockAdmin(admin.ModelAdmin):
    """Read-only: locks are lifted through the management API, which audits it."""

    list_display = ["kind", "key", "until", "created_at"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
