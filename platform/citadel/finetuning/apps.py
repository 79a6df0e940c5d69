from django.apps import AppConfig


class FineTuningConfig(AppConfig):
    name = "citadel.finetuning"
    label = "finetuning"
    verbose_name = "Fine-tuning"
