from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('jobs', '0003_residency'),
    ]

    operations = [
        migrations.CreateModel(
            name='JobLease',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('kind', models.CharField(choices=[('inference', 'Inference'), ('fine_tuning', 'Fine Tuning'), ('batch', 'Batch')], max_length=16)),
                ('job_id', models.CharField(max_length=64)),
                ('worker_name', models.CharField(max_length=200)),
                ('attempt', models.PositiveIntegerField(default=1)),
                ('acquired_at', models.DateTimeField()),
                ('expires_at', models.DateTimeField(db_index=True)),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('kind', 'job_id'), name='one_lease_per_job')],
            },
        ),
    ]
