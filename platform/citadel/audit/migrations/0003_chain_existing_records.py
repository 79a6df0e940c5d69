"""Chain the records written before the audit log was hash-chained.

They are renumbered 1..n in their existing order (gaps came from rolled-back transactions of the
old auto-increment key) and hashed in that order, so the verifier checks them like any others.
Runs before 0004 installs the append-only trigger.
"""

from django.db import migrations


def chain_existing(apps, schema_editor):
    from citadel.audit import chain

    AuditRecord = apps.get_model("audit", "AuditRecord")
    using = schema_editor.connection.alias
    prev_hash = chain.GENESIS_HASH
    for number, old in enumerate(AuditRecord.objects.using(using).order_by("sequence")
                                 .values_list("sequence", flat=True), start=1):
        if old != number:  # ascending, so the new number is always free
            AuditRecord.objects.using(using).filter(sequence=old).update(sequence=number)
        record = AuditRecord.objects.using(using).get(sequence=number)
        row = {name: getattr(record, name) for name in chain.FIELDS}
        row["prev_hash"] = prev_hash
        record_hash = chain.record_hash(row)
        AuditRecord.objects.using(using).filter(sequence=number).update(prev_hash=prev_hash, record_hash=record_hash)
        prev_hash = record_hash


class Migration(migrations.Migration):

    dependencies = [
        ("audit", "0002_chain_checkpoints_holds"),
    ]

    operations = [
        migrations.RunPython(chain_existing, migrations.RunPython.noop),
    ]
