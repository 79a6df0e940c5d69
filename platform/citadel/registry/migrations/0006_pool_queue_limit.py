from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("registry", "0005_model_manifest"),
    ]

    operations = [
        migrations.AddField(
            model_name="workerpool",
            name="queue_limit",
            field=models.PositiveIntegerField(blank=True, help_text="Requests queued beyond the workers' slots before new ones get 429 (empty: CITADEL_POOL_QUEUE_LIMIT).", null=True),
        ),
    ]
