import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('accounts', '0003_apikey_data_class_required'),
        ('residency', '0001_initial'),
    ]

    operations = [
        migrations.CreateModel(
            name='Policy',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('processing_jurisdictions', models.JSONField(blank=True, default=list)),
                ('storage_jurisdictions', models.JSONField(blank=True, default=list)),
                ('prompt_retention', models.CharField(choices=[('none', 'Nothing of the prompt is kept'), ('metadata', 'Only its shape (messages, roles, lengths)'), ('redacted', 'The text with personal data replaced by placeholders'), ('full', 'The text as sent')], default='none', max_length=16)),
                ('retention_days', models.PositiveIntegerField(blank=True, help_text='How long what is kept of a prompt stays; empty: until deleted.', null=True)),
                ('fine_tuning_allowed', models.BooleanField(default=False)),
                ('description', models.TextField(blank=True)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
                ('updated_at', models.DateTimeField(auto_now=True)),
                ('data_class', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='policies', to='residency.dataclass')),
                ('processing_sites', models.ManyToManyField(blank=True, related_name='processing_policies', to='residency.site')),
                ('storage_sites', models.ManyToManyField(blank=True, related_name='storage_policies', to='residency.site')),
                ('team', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='policies', to='accounts.team')),
            ],
            options={
                'verbose_name_plural': 'policies',
                'ordering': ['data_class__rank', 'team__name'],
                'constraints': [models.UniqueConstraint(condition=models.Q(('team__isnull', False)), fields=('team', 'data_class'), name='one_policy_per_team_and_class'), models.UniqueConstraint(condition=models.Q(('team__isnull', True)), fields=('data_class',), name='one_default_policy_per_class')],
            },
        ),
    ]
