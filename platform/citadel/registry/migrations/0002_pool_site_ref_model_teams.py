import django.db.models.deletion
from django.db import migrations, models


def sites_from_pools(apps, schema_editor):
    """One Site per distinct free-text site of the existing pools; its jurisdiction is unknown."""
    Site = apps.get_model("residency", "Site")
    WorkerPool = apps.get_model("registry", "WorkerPool")
    for pool in WorkerPool.objects.all():
        name = (pool.site or "local").strip()[:100] or "local"
        site, _ = Site.objects.get_or_create(name=name, defaults={"jurisdiction": "unspecified"})
        pool.site_ref = site
        pool.save(update_fields=["site_ref"])


class Migration(migrations.Migration):

    dependencies = [
        ('accounts', '0003_apikey_data_class_required'),
        ('registry', '0001_initial'),
        ('residency', '0001_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='model',
            name='teams',
            field=models.ManyToManyField(blank=True, help_text="Teams that use this model: it may be deployed only at sites where their policies allow processing their keys' data classes (citadel.residency).", related_name='models', to='accounts.team'),
        ),
        migrations.AddField(
            model_name='workerpool',
            name='site_ref',
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='residency.site'),
        ),
        migrations.RunPython(sites_from_pools, migrations.RunPython.noop),
    ]
