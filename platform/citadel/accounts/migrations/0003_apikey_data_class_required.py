import django.db.models.deletion
from django.db import migrations, models

import citadel.residency.models


class Migration(migrations.Migration):
    """Separate from 0002: PostgreSQL refuses to alter a table with pending trigger events from
    the rows 0002 updated in its transaction."""

    dependencies = [
        ('accounts', '0002_team_apikey_residency'),
    ]

    operations = [
        migrations.AlterField(
            model_name='apikey',
            name='data_class',
            field=models.ForeignKey(default=citadel.residency.models.default_data_class_id, help_text='The class of the data sent with this key; a request may raise it.', on_delete=django.db.models.deletion.PROTECT, related_name='api_keys', to='residency.dataclass'),
        ),
    ]
