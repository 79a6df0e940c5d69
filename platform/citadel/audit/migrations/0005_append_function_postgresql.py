"""On PostgreSQL, appends run in one server-side function: lock, head, number, hash, insert.

citadel.audit.services.audit_record calls citadel_audit_append(...) so that the chain lock is
held for as little as possible: one statement (and, in autocommit, no round trip at all between
taking the lock and committing). The hash is SHA-256 over the canonical encoding of
citadel/audit/chain.py: Python passes the canonical JSON cut into five pieces around the four
values only known under the lock (created_at, prev_hash, sequence, source_address as the database
prints it), and the function joins them. When the lock was free, the transaction commits as
usual; when others hold or wait for it, the transaction commits without waiting for its WAL
flush (synchronous_commit off, transaction-local) and audit_record waits for the flush after the
commit, outside the lock, so concurrent appends share fsyncs instead of queueing behind each
one. SQLite appends in Python instead.
"""

from django.db import migrations

CHAIN_LOCK_KEY = int.from_bytes(b"citadel", "big")  # citadel.audit.services.CHAIN_LOCK_KEY

FUNCTION = r"""
CREATE OR REPLACE FUNCTION citadel_audit_append(
    p_actor_type text, p_actor_id text, p_actor_label text, p_action text, p_target_type text,
    p_target_id text, p_outcome text, p_request_id text, p_source_address inet, p_details jsonb,
    p_pieces text[], p_genesis text)
RETURNS TABLE (o_sequence bigint, o_created_at timestamptz, o_source_address text, o_prev_hash text,
               o_record_hash text, o_durable boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_sequence bigint;
    v_prev text;
    v_time timestamptz;
    v_hash text;
    v_durable boolean := true;
BEGIN
    IF NOT pg_try_advisory_xact_lock(%(key)s) THEN
        -- others are appending: commit without waiting for the flush, so as not to make them
        -- wait for it too; the caller waits for the flush after the commit (o_durable false)
        PERFORM set_config('synchronous_commit', 'off', true);
        PERFORM pg_advisory_xact_lock(%(key)s);
        v_durable := false;
    END IF;
    -- a new snapshot per statement (read committed): the head below is the latest committed one
    SELECT r.sequence, r.record_hash INTO v_sequence, v_prev
        FROM audit_auditrecord r ORDER BY r.sequence DESC LIMIT 1;
    IF NOT FOUND THEN
        SELECT p.boundary_sequence - 1, p.boundary_prev_hash INTO v_sequence, v_prev
            FROM audit_auditpurge p ORDER BY p.boundary_sequence DESC, p.id DESC LIMIT 1;
        IF NOT FOUND THEN
            v_sequence := 0;
            v_prev := p_genesis;
        END IF;
    END IF;
    v_sequence := v_sequence + 1;
    v_time := clock_timestamp();
    v_hash := encode(sha256(convert_to(
        p_pieces[1] || '"' || to_char(v_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"'
        || p_pieces[2] || '"' || v_prev || '"'
        || p_pieces[3] || v_sequence::text
        || p_pieces[4] || coalesce('"' || host(p_source_address) || '"', 'null')
        || p_pieces[5], 'UTF8')), 'hex');
    INSERT INTO audit_auditrecord (sequence, created_at, actor_type, actor_id, actor_label, action, target_type,
                                   target_id, outcome, request_id, source_address, details, prev_hash, record_hash)
        VALUES (v_sequence, v_time, p_actor_type, p_actor_id, p_actor_label, p_action, p_target_type,
                p_target_id, p_outcome, p_request_id, p_source_address, p_details, v_prev, v_hash);
    RETURN QUERY SELECT v_sequence, v_time, host(p_source_address), v_prev, v_hash, v_durable;
END
$$;
""" % {"key": CHAIN_LOCK_KEY}


def install(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FUNCTION, None)


def uninstall(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP FUNCTION IF EXISTS citadel_audit_append(text, text, text, text, text, text, text, "
                              "text, inet, jsonb, text[], text)", None)


class Migration(migrations.Migration):

    dependencies = [
        ("audit", "0004_append_only_postgresql"),
    ]

    operations = [
        migrations.RunPython(install, uninstall),
    ]
