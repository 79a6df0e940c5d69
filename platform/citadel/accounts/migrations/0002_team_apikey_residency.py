import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def keys_internal(apps, schema_editor):
    """Keys made before residency carry the default class, internal."""
    DataClass = apps.get_model("residency", "DataClass")
    ApiKey = apps.get_model("accounts", "ApiKey")
    ApiKey.objects.filter(data_class__isnull=True).update(data_class=DataClass.objects.get(name="internal"))


class Migration(migrations.Migration):

    dependencies = [
        ('accounts', '0001_initial'),
        ('residency', '0001_initial'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='Team',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.SlugField(max_length=64, unique=True)),
                ('description', models.TextField(blank=True)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
                ('members', models.ManyToManyField(blank=True, related_name='teams', to=settings.AUTH_USER_MODEL)),
            ],
            options={
                'ordering': ['name'],
            },
        ),
        migrations.AddField(
            model_name='apikey',
            name='team',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='api_keys', to='accounts.team'),
        ),
        migrations.AddField(
            model_name='apikey',
            name='data_class',
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.PROTECT, related_name='api_keys', to='residency.dataclass'),
        ),
        migrations.RunPython(keys_internal, migrations.RunPython.noop),
    ]
