"""On PostgreSQL, the audit tables refuse UPDATE, DELETE and TRUNCATE: a trigger and privileges.

- A trigger on audit_auditrecord, audit_auditcheckpoint and audit_auditpurge raises on every
  UPDATE and DELETE, for every role including the table's owner (the application's role).
  The one exception is a retention purge (citadel.audit.services.audit_purge): inside its
  transaction it sets `citadel.audit_purge` (SET LOCAL semantics, via set_config(..., true)) to
  the purge boundary, and the trigger then lets it delete audit_auditrecord rows below that
  sequence number. This guards against accidents and application bugs; a role that can run
  arbitrary SQL could set it too, which is why the chain and its signed checkpoints, not the
  trigger, are what proves integrity (VERIFYING.md).
- TRUNCATE is refused by a statement trigger except for superusers (Django's `flush` in test
  runs uses it; a superuser can disable triggers anyway, and the verifier detects the result).
- UPDATE and TRUNCATE privileges are revoked from PUBLIC and from the migrating role (the
  owner), and DELETE too on checkpoints and purge manifests. Superusers bypass privileges.

SQLite (the embedded mode) has none of this; the hash chain still detects changes there.
"""

from django.db import migrations

TABLES = ("audit_auditrecord", "audit_auditcheckpoint", "audit_auditpurge")

FUNCTION = r"""
CREATE OR REPLACE FUNCTION citadel_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    purge_below text := current_setting('citadel.audit_purge', true);
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF current_setting('is_superuser') = 'on' THEN
            RETURN NULL;
        END IF;
    ELSIF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_auditrecord' THEN
        IF purge_below ~ '^[0-9]+$' THEN
            IF OLD.sequence < purge_below::bigint THEN
                RETURN OLD;
            END IF;
        END IF;
    END IF;
    RAISE EXCEPTION 'the audit log is append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Records leave the audit log only through retention purges (citadel audit purge).';
END
$$;
"""


def install(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    statements = [FUNCTION]
    for table in TABLES:
        statements += [
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION citadel_audit_append_only()",
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION citadel_audit_append_only()",
            f"REVOKE UPDATE, TRUNCATE ON {table} FROM PUBLIC, CURRENT_USER",
        ]
    statements.append("REVOKE DELETE ON audit_auditcheckpoint, audit_auditpurge FROM PUBLIC, CURRENT_USER")
    for statement in statements:
        schema_editor.execute(statement, None)  # no parameters: the function's % are its own


def uninstall(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in TABLES:
        schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        schema_editor.execute(f"GRANT UPDATE, DELETE, TRUNCATE ON {table} TO CURRENT_USER")
    schema_editor.execute("DROP FUNCTION IF EXISTS citadel_audit_append_only()")


class Migration(migrations.Migration):

    dependencies = [
        ("audit", "0003_chain_existing_records"),
    ]

    operations = [
        migrations.RunPython(install, uninstall),
    ]
