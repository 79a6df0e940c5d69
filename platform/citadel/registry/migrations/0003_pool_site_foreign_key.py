import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    """The free-text site gives way to the Site rows 0002 made (a separate migration, since
    PostgreSQL refuses to alter a table with pending trigger events from 0002's updates)."""

    dependencies = [
        ('registry', '0002_pool_site_ref_model_teams'),
    ]

    operations = [
        migrations.RemoveField(
            model_name='workerpool',
            name='site',
        ),
        migrations.RenameField(
            model_name='workerpool',
            old_name='site_ref',
            new_name='site',
        ),
        migrations.AlterField(
            model_name='workerpool',
            name='site',
            field=models.ForeignKey(help_text="Where the pool's hardware is; residency policies allow or refuse it.", on_delete=django.db.models.deletion.PROTECT, related_name='pools', to='residency.site'),
        ),
    ]
