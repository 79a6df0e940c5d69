"""Settings come from the environment; production refuses to start without its secrets."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_manage(args, **env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("DJANGO_SECRET_KEY", "DATABASE_URL", "CITADEL_AUDIT_SIGNING_KEY")}
    full_env.update(env)
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT)


def test_check_deploy_reports_nothing_under_production_settings_with_the_required_variables(tmp_path):
    result = run_manage(["check", "--deploy", "--fail-level", "WARNING"],
                        DJANGO_SETTINGS_MODULE="citadel.settings.production",
                        DJANGO_SECRET_KEY="a-long-random-production-secret-" + "x7Yq2" * 10,
                        CITADEL_AUDIT_SIGNING_KEY="A" * 43 + "=",  # base64 of a 32-byte Ed25519 seed
                        ALLOWED_HOSTS="citadel.example.org", CITADEL_DATA_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_production_settings_without_a_secret_key_fail_at_start(tmp_path):
    result = run_manage(["check"], DJANGO_SETTINGS_MODULE="citadel.settings.production",
                        CITADEL_DATA_DIR=str(tmp_path))
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr


def test_production_settings_without_an_audit_signing_key_fail_at_start(tmp_path):
    result = run_manage(["check"], DJANGO_SETTINGS_MODULE="citadel.settings.production",
                        DJANGO_SECRET_KEY="a-long-random-production-secret-" + "x7Yq2" * 10,
                        CITADEL_DATA_DIR=str(tmp_path))
    assert result.returncode != 0
    assert "CITADEL_AUDIT_SIGNING_KEY" in result.stderr


def test_the_database_and_broker_come_from_the_environment(tmp_path):
    code = ("from django.conf import settings as s; "
            "print(s.DATABASES['default']['ENGINE'], s.DATABASES['default']['NAME'], s.CELERY_BROKER_URL)")
    result = run_manage(["shell", "-c", code], DJANGO_SETTINGS_MODULE="citadel.settings.local",
                        DATABASE_URL="postgres://u@db.internal:5432/citadel",
                        CELERY_BROKER_URL="amqp://guest:guest@mq.internal:5672//", CITADEL_DATA_DIR=str(tmp_path))
    assert result.stdout.strip().splitlines()[-1].split() == ["django.db.backends.postgresql", "citadel", "amqp://guest:guest@mq.internal:5672//"]


def test_the_models_and_their_migrations_agree(tmp_path):
    result = run_manage(["makemigrations", "--check", "--dry-run"], DJANGO_SETTINGS_MODULE="citadel.settings.test",
                        CITADEL_DATA_DIR=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
