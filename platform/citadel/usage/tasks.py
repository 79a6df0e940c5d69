"""Beat: meter ended fine-tuning jobs (see usage_meter_fine_tuning)."""

from celery import shared_task
from celery.signals import worker_ready

from citadel.usage.services import usage_meter_fine_tuning


@shared_task(name="citadel.usage.meter_fine_tuning", soft_time_limit=120, time_limit=150, ignore_result=True)
def meter_fine_tuning() -> int:
    return usage_meter_fine_tuning()


@worker_ready.connect
def _metrics_on_worker(sender, **kwargs):
    """A worker samples its engines' tokens per second and, when asked, serves its metrics (METRICS.md)."""
    from citadel.usage.metrics import worker_metrics_start

    worker_metrics_start()
