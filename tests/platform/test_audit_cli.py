"""`citadel audit verify|export|...`, and the documented outside verification of an export."""

import base64
import csv
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection

from citadel.audit import chain
from citadel.audit.models import AuditRecord, LegalHold
from citadel.audit.services import Actor, audit_record, checkpoint_create
from citadel.audit.signing import public_key_b64
from tests.conftest import require

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
VERIFYING = ROOT / "platform" / "citadel" / "audit" / "VERIFYING.md"


def append_some() -> list[int]:
    """Four records and a checkpoint of the head; their sequence numbers."""
    records = []
    for i in range(3):
        records.append(audit_record(actor=Actor("user", "1", "alice"), action="api_key.create", outcome="success",
                     target_type="api_key", target_id=f"k{i}", details={"name": f"key {i}", "ünï": "cödé"},
                     source_address="10.0.0.7"))
    records.append(audit_record(actor=Actor("anonymous", "", "bob"), action="user.login", outcome="failure",
                                details={"ratio": 0.1}))
    checkpoint_create()
    return [record.sequence for record in records]


def run(*args) -> str:
    out = io.StringIO()
    call_command("audit", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.fixture
def outside_verifier(tmp_path):
    """The Python snippet from VERIFYING.md, as an auditor would save it."""
    code = re.search(r"```python\n(.*?)```", VERIFYING.read_text(), re.S).group(1)
    path = tmp_path / "verify_audit.py"
    path.write_text(code)
    return path


def test_verify_says_ok_for_an_intact_log():
    append_some()
    assert run("verify").startswith(f"OK: {AuditRecord.objects.count()} records")


def test_verify_exits_1_naming_the_sequence_of_a_tampered_row():
    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")
    second = append_some()[1]
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_auditrecord DISABLE TRIGGER USER")
        cursor.execute("UPDATE audit_auditrecord SET actor_label = 'mallory' WHERE sequence = %s", [second])
        cursor.execute("ALTER TABLE audit_auditrecord ENABLE TRIGGER USER")
    err = io.StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("audit", "verify", stdout=io.StringIO(), stderr=err)
    assert exited.value.code == 1
    assert err.getvalue().startswith(f"FAILED at sequence {second}: hash_mismatch")


def test_verify_with_another_public_key_rejects_the_checkpoints(tmp_path):
    append_some()
    stranger = base64.b64encode(bytes(range(32))).decode()
    err = io.StringIO()
    with pytest.raises(SystemExit):
        call_command("audit", "verify", "--public-key", stranger, stdout=io.StringIO(), stderr=err)
    assert "untrusted_key" in err.getvalue()
    assert run("verify", "--public-key", public_key_b64()).startswith("OK")


def test_the_public_key_command_prints_pem_and_base64():
    out = run("public-key")
    assert "-----BEGIN PUBLIC KEY-----" in out and f"base64: {public_key_b64()}" in out


def test_a_jsonl_export_verifies_with_the_documented_snippet_and_tampering_fails_it(tmp_path, outside_verifier):
    append_some()
    path = tmp_path / "audit.jsonl"
    run("export", "--format", "jsonl", "--out", str(path))
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["public_keys"][0]["public_key"] == public_key_b64()
    kinds = [line["type"] for line in lines]
    assert kinds.count("record") == AuditRecord.objects.count() and kinds.count("checkpoint") == 1
    assert [line for line in lines if line["type"] == "record"][-1]["action"] == "audit.export"  # audited first

    verify = [sys.executable, str(outside_verifier), str(path), public_key_b64()]
    done = subprocess.run(verify, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stdout + done.stderr

    tampered = [dict(line) for line in lines]
    tampered[2]["details"] = {**tampered[2]["details"], "name": "changed"}
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in tampered), encoding="utf-8")
    done = subprocess.run(verify, capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout.startswith(f"FAILED at sequence {tampered[2]['sequence']}")

    forged = [dict(line) for line in lines]
    checkpoint = next(line for line in forged if line["type"] == "checkpoint")
    checkpoint["signature"] = checkpoint["signature"][:10] + ("A" if checkpoint["signature"][10] != "A" else "B") + \
        checkpoint["signature"][11:]
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in forged), encoding="utf-8")
    done = subprocess.run(verify, capture_output=True, text=True)
    assert done.returncode == 1 and "bad signature" in done.stdout


def test_a_csv_export_carries_hashes_that_recompute_from_its_columns(tmp_path):
    append_some()
    path = tmp_path / "audit.csv"
    run("export", "--format", "csv", "--out", str(path))
    rows = list(csv.DictReader(path.open(encoding="utf-8", newline="")))
    records = [row for row in rows if row["kind"] == "record"]
    assert len(records) == AuditRecord.objects.count() and {row["kind"] for row in rows} == {"public_key", "record", "checkpoint"}
    for row in records:
        body = {name: row[name] for name in chain.FIELDS}
        body.update(sequence=int(row["sequence"]), details=json.loads(row["details"]),
                    source_address=row["source_address"] or None)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        assert hashlib.sha256(canonical).hexdigest() == row["record_hash"]


def test_an_export_filters_by_action_actor_and_outcome_and_is_audited_with_its_filters():
    append_some()
    out = run("export", "--action", "api_key.*", "--actor", "alice")
    records = [json.loads(line) for line in out.splitlines() if '"type": "record"' in line]
    assert [r["target_id"] for r in records] == ["k0", "k1", "k2"]
    out = run("export", "--outcome", "failure")
    assert [json.loads(line)["action"] for line in out.splitlines() if '"type": "record"' in line] == ["user.login"]
    exports = AuditRecord.objects.filter(action="audit.export").order_by("sequence")
    assert exports[0].details["filters"] == {"action": "api_key.*", "actor": "alice"}
    assert exports[0].actor_label.startswith("cli (")


def test_an_export_by_time_uses_since_and_until():
    append_some()
    records = list(AuditRecord.objects.order_by("sequence"))
    out = run("export", "--since", records[1].created_at.isoformat(), "--until", records[3].created_at.isoformat())
    assert [json.loads(line)["sequence"] for line in out.splitlines() if '"type": "record"' in line] == \
        [records[1].sequence, records[2].sequence]


def test_checkpoint_purge_and_hold_commands():
    head = append_some()[-1]
    assert "Nothing to sign" in run("checkpoint")
    assert run("checkpoint", "--force").startswith(f"Signed record {head}")
    assert "placed" in run("hold", "add", "--reason", "matter 7", "--target-id", "k1")
    hold = LegalHold.objects.get()
    assert f"{hold.pk}\tactive\tmatter 7\ttarget_id=k1" in run("hold", "list")
    assert run("purge", "--older-than-days", "30") == "Nothing to purge.\n"
    assert "released" in run("hold", "release", str(hold.pk))
    assert AuditRecord.objects.filter(action__startswith="audit.legal_hold").count() == 2


@pytest.mark.django_db(transaction=True)
def test_citadel_audit_verify_exits_0_then_1_in_a_separate_process(cli_env):
    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")
    third = append_some()[2]
    verify = [sys.executable, "-m", "citadel.cli", "audit", "verify"]
    cli_env["CITADEL_AUDIT_SIGNING_KEY"] = _signing_key_text()  # the same key as this process
    done = subprocess.run(verify, env=cli_env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stdout + done.stderr
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_auditrecord DISABLE TRIGGER USER")
        cursor.execute("DELETE FROM audit_auditrecord WHERE sequence = %s", [third])
        cursor.execute("ALTER TABLE audit_auditrecord ENABLE TRIGGER USER")
    done = subprocess.run(verify, env=cli_env, capture_output=True, text=True)
    assert done.returncode == 1
    assert f"FAILED at sequence {third}: missing_sequence" in done.stderr


def _signing_key_text() -> str:
    from cryptography.hazmat.primitives import serialization

    from citadel.audit.signing import signing_key

    raw = signing_key().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption())
    return base64.b64encode(raw).decode()


def test_local_settings_make_a_signing_key_file_with_mode_0600_once(settings, tmp_path):
    from citadel.audit.signing import public_key_b64

    settings.CITADEL_AUDIT_SIGNING_KEY = ""
    settings.CITADEL_AUDIT_SIGNING_KEY_FILE = tmp_path / "data" / "audit_signing_key"
    first = public_key_b64()
    assert (settings.CITADEL_AUDIT_SIGNING_KEY_FILE.stat().st_mode & 0o777) == 0o600
    assert public_key_b64() == first


def test_without_a_key_or_a_key_file_signing_refuses_to_start(settings):
    from django.core.exceptions import ImproperlyConfigured

    from citadel.audit.signing import signing_key

    settings.CITADEL_AUDIT_SIGNING_KEY, settings.CITADEL_AUDIT_SIGNING_KEY_FILE = "", None
    with pytest.raises(ImproperlyConfigured, match="CITADEL_AUDIT_SIGNING_KEY"):
        signing_key()
    settings.CITADEL_AUDIT_SIGNING_KEY = "not a key"
    with pytest.raises(ImproperlyConfigured, match="audit keygen"):
        signing_key()


def test_a_keygen_key_and_a_pem_key_both_sign(settings):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from citadel.audit.signing import sign, signature_valid

    settings.CITADEL_AUDIT_SIGNING_KEY = run("keygen").strip()
    _, public, signature = sign({"x": 1})
    assert signature_valid(public, {"x": 1}, signature)
    settings.CITADEL_AUDIT_SIGNING_KEY = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    _, public, signature = sign({"x": 1})
    assert signature_valid(public, {"x": 1}, signature)


def test_beat_signs_the_head_through_the_checkpoint_task():
    from django.conf import settings

    from citadel.audit.tasks import audit_checkpoint, audit_retention_purge

    assert settings.CELERY_BEAT_SCHEDULE["audit-checkpoint"]["task"] == audit_checkpoint.name
    assert settings.CELERY_BEAT_SCHEDULE["audit-retention-purge"]["task"] == audit_retention_purge.name
    append_some()
    head = AuditRecord.objects.order_by("-sequence").first()
    audit_checkpoint.apply().get()  # the head was signed by append_some already: nothing new
    audit_record(actor=Actor.system(), action="test.more", outcome="success")
    assert audit_checkpoint.apply().get() == head.sequence + 1
    assert audit_retention_purge.apply().get() == 0  # CITADEL_AUDIT_RETENTION_DAYS is 0: keep everything


def test_an_export_after_a_purge_still_verifies_with_the_documented_snippet(tmp_path, outside_verifier):
    from datetime import timedelta

    from citadel.audit.services import audit_purge, legal_hold_create

    append_some()
    records = list(AuditRecord.objects.order_by("sequence"))
    legal_hold_create(reason="matter", actor=Actor.system(), target_id="k0")
    audit_purge(older_than_days=1, actor=Actor.system(), now=records[2].created_at + timedelta(days=1))
    path = tmp_path / "audit.jsonl"
    run("export", "--out", str(path))
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [line["sequence"] for line in lines if line["type"] == "record"][0] == records[0].sequence  # held
    assert any(line["type"] == "purge" for line in lines)
    done = subprocess.run([sys.executable, str(outside_verifier), str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stdout + done.stderr
    assert run("verify").startswith("OK")
