from django.apps import AppConfig
from django.db.models.signals import post_migrate


def ensure_builtin_data_classes(sender, using="default", **kwargs):
    """The built-in data classes exist after every migrate and flush (a flush, as tests do, would
    otherwise leave API keys without their default class)."""
    from citadel.residency.models import BUILTIN_DATA_CLASSES, DataClass

    for name, rank, description in BUILTIN_DATA_CLASSES:
        DataClass.objects.using(using).get_or_create(name=name, defaults={"rank": rank, "description": description,
                                                                          "builtin": True})


class ResidencyConfig(AppConfig):
    name = "citadel.residency"
    label = "residency"

    def ready(self):
        post_migrate.connect(ensure_builtin_data_classes, sender=self)
