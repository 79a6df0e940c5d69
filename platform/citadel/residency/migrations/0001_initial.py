from django.db import migrations, models

BUILTINS = [
    ("public", 0, "May be published."),
    ("internal", 10, "For the organisation's own use; the default class of an API key."),
    ("confidential", 20, "Limited to those who need it."),
    ("restricted", 30, "The most sensitive: regulated or secret."),
]


def seed_data_classes(apps, schema_editor):
    DataClass = apps.get_model("residency", "DataClass")
    for name, rank, description in BUILTINS:
        DataClass.objects.get_or_create(name=name, defaults={"rank": rank, "description": description,
                                                             "builtin": True})


class Migration(migrations.Migration):

    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name='DataClass',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.SlugField(help_text='e.g. internal, phi, pci.', max_length=64, unique=True)),
                ('rank', models.PositiveIntegerField(help_text='Sensitivity: a request may raise its class, never lower it.')),
                ('description', models.TextField(blank=True)),
                ('builtin', models.BooleanField(default=False, editable=False)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
            ],
            options={
                'verbose_name_plural': 'data classes',
                'ordering': ['rank', 'name'],
            },
        ),
        migrations.CreateModel(
            name='Site',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=100, unique=True)),
                ('region', models.CharField(blank=True, help_text='e.g. eu-central, Frankfurt DC2.', max_length=100)),
                ('jurisdiction', models.CharField(default='unspecified', help_text="The legal area the site is in, e.g. EU, DE, US, UK. 'unspecified' matches no policy rule by jurisdiction: such a site is allowed only where a policy names it.", max_length=64)),
                ('storage_path', models.CharField(blank=True, help_text='Where files stored at this site live.', max_length=500)),
                ('description', models.TextField(blank=True)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
            ],
            options={
                'ordering': ['name'],
            },
        ),
        migrations.RunPython(seed_data_classes, migrations.RunPython.noop),
    ]
