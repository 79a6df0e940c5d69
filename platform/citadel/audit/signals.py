"""Changes made in Django's admin reach the audit log too (admin writes a LogEntry for each).

The admin's LogEntry carries no request, so these records have no source address or request id.
"""

from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.db.models.signals import post_save
from django.dispatch import receiver

from citadel.audit.services import Actor, audit_record

_ACTIONS = {ADDITION: "add", CHANGE: "change", DELETION: "delete"}


@receiver(post_save, sender=LogEntry)
def _audit_admin_change(sender, instance: LogEntry, created: bool, **kwargs):
    if not created:
        return
    target_type = instance.content_type.model if instance.content_type_id else ""
    audit_record(
        actor=Actor.for_user(instance.user), action=f"admin.{_ACTIONS.get(instance.action_flag, 'unknown')}",
        outcome="success", target_type=target_type, target_id=instance.object_id or "",
        details={"object": instance.object_repr, "change": instance.get_change_message()},
    )
