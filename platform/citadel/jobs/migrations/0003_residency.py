import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('accounts', '0003_apikey_data_class_required'),
        ('jobs', '0002_logprobs'),
        ('residency', '0001_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='inferencejob',
            name='data_class',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='jobs', to='residency.dataclass'),
        ),
        migrations.AddField(
            model_name='inferencejob',
            name='prompt_kept_until',
            field=models.DateTimeField(blank=True, help_text='When what was kept of the prompt is to be removed.', null=True),
        ),
        migrations.AddField(
            model_name='inferencejob',
            name='prompt_retention',
            field=models.CharField(blank=True, help_text='What the policy keeps of the prompt when the job ends.', max_length=16),
        ),
        migrations.AddField(
            model_name='inferencejob',
            name='site',
            field=models.ForeignKey(blank=True, help_text='Where the job was sent to run (its pool\'s site then).', null=True, on_delete=django.db.models.deletion.PROTECT, related_name='jobs', to='residency.site'),
        ),
        migrations.AddField(
            model_name='inferencejob',
            name='team',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='jobs', to='accounts.team'),
        ),
    ]
