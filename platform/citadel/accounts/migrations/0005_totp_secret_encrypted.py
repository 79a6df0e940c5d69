"""TOTP secrets are kept encrypted (Fernet, a key derived from SECRET_KEY): existing ones are encrypted in place."""

from django.db import migrations, models


def encrypt_existing(apps, schema_editor):
    from citadel.accounts.models import _secret_cipher

    TotpDevice = apps.get_model("accounts", "TotpDevice")
    cipher = _secret_cipher()
    for device in TotpDevice.objects.all():
        device.secret_encrypted = cipher.encrypt(device.secret_encrypted.encode()).decode()
        device.save(update_fields=["secret_encrypted"])


class Migration(migrations.Migration):

    dependencies = [("accounts", "0004_membership_roles")]

    operations = [
        migrations.RenameField(model_name="totpdevice", old_name="secret", new_name="secret_encrypted"),
        migrations.AlterField(
            model_name="totpdevice",
            name="secret_encrypted",
            field=models.TextField(help_text="The base32 secret, encrypted with a key derived from SECRET_KEY "
                                             "(Fernet; SECRET_KEY_FALLBACKS still decrypt after a rotation)."),
        ),
        migrations.RunPython(encrypt_existing, migrations.RunPython.noop),
    ]
