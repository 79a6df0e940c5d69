"""Team memberships get a role: the plain many-to-many table becomes the Membership model in place
(state only), then gains its columns, so existing members stay members (as ML engineers)."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

import citadel.accounts.models


class Migration(migrations.Migration):

    dependencies = [
        ("accounts", "0003_apikey_data_class_required"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="Membership",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                                   verbose_name="ID")),
                        ("team", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE,
                                                   related_name="memberships", to="accounts.team")),
                        ("user", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE,
                                                   related_name="memberships", to=settings.AUTH_USER_MODEL)),
                    ],
                    options={"db_table": "accounts_team_members", "unique_together": {("team", "user")},
                             "ordering": ["team__name", "user__username"]},
                ),
                migrations.AlterField(
                    model_name="team",
                    name="members",
                    field=models.ManyToManyField(blank=True, related_name="teams", through="accounts.Membership",
                                                 to=settings.AUTH_USER_MODEL),
                ),
            ],
        ),
        migrations.AddField(
            model_name="membership",
            name="role",
            field=models.CharField(choices=[("admin", "Team administrator"), ("operator", "Operator"),
                                            ("ml_engineer", "ML engineer"), ("auditor", "Auditor"),
                                            ("application", "Application")],
                                   default="ml_engineer", max_length=16),
        ),
        migrations.AddField(
            model_name="membership",
            name="source",
            field=models.CharField(default="local", max_length=16,
                                   help_text="'local' when granted in Citadel, 'oidc' when mapped from the identity "
                                             "provider's groups at login (and replaced at the next login)."),
        ),
        migrations.AddField(
            model_name="apikey",
            name="scopes",
            field=models.JSONField(default=citadel.accounts.models.all_endpoint_groups,
                                   help_text="Endpoint groups the key may call (see EndpointGroup)."),
        ),
        migrations.AddField(
            model_name="apikey",
            name="allowed_models",
            field=models.JSONField(blank=True, default=list,
                                   help_text="Model names the key may use; empty: every model its team may use."),
        ),
        migrations.CreateModel(
            name="LoginFailure",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("username", models.CharField(db_index=True, max_length=150)),
                ("address", models.GenericIPAddressField(blank=True, db_index=True, null=True)),
                ("at", models.DateTimeField(auto_now_add=True, db_index=True)),
            ],
        ),
        migrations.CreateModel(
            name="LoginLock",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("kind", models.CharField(choices=[("account", "Account"), ("address", "Address")], max_length=8)),
                ("key", models.CharField(max_length=150)),
                ("until", models.DateTimeField()),
                ("created_at", models.DateTimeField(auto_now_add=True)),
            ],
            options={"unique_together": {("kind", "key")}},
        ),
        migrations.CreateModel(
            name="TotpDevice",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("secret", models.CharField(help_text="Base32, as in the otpauth URI.", max_length=64)),
                ("confirmed_at", models.DateTimeField(blank=True, null=True)),
                ("last_step", models.BigIntegerField(default=0)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("user", models.OneToOneField(on_delete=django.db.models.deletion.CASCADE,
                                              related_name="totp_device", to=settings.AUTH_USER_MODEL)),
            ],
        ),
    ]
