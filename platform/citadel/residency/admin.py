from django.contrib import admin

from citadel.residency.models import DataClass, Policy, Site

admin.site.register(Site)
admin.site.register(DataClass)


@admin.register(Policy)
class PolicyAdmin(admin.ModelAdmin):
    list_display = ["id", "team", "data_class", "prompt_retention", "retention_days", "fine_tuning_allowed"]
    filter_horizontal = ["processing_sites", "storage_sites"]
