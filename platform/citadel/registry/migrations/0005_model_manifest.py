"""Model.manifest: the SHA-256 of the files an engine loads, recorded at import.

Models registered before it get theirs here when this host sees their folder; the others keep an
empty manifest, which a worker refuses to load until `citadel model_manifest MODEL` records it.
"""

from pathlib import Path

from django.db import migrations, models


def record_visible(apps, schema_editor):
    from citadel.registry.manifest import ModelFileRejected, manifest_build

    Model = apps.get_model("registry", "Model")
    for model in Model.objects.filter(base__isnull=True):
        folder = Path(model.path)
        if not folder.is_dir():
            continue
        try:
            model.manifest = manifest_build(folder)
        except ModelFileRejected:
            continue  # pickle or no safetensors: stays empty, so a worker refuses it with the reason
        model.save(update_fields=["manifest"])


class Migration(migrations.Migration):

    dependencies = [
        ("registry", "0004_model_variants"),
    ]

    operations = [
        migrations.AddField(
            model_name="model",
            name="manifest",
            field=models.JSONField(blank=True, default=dict, help_text="{file name: SHA-256} of the files the engine loads, recorded at import and checked by a worker before it loads the model (citadel.registry.manifest)."),
        ),
        migrations.RunPython(record_visible, migrations.RunPython.noop),
    ]
