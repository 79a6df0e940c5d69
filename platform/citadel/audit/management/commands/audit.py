"""`citadel audit verify|export|checkpoint|public-key|keygen|purge|hold`: the audit log for operators
and compliance officers.

`verify` exits 0 when the chain and every signature check out, otherwise 1 after printing the
first failing sequence number and why. See platform/citadel/audit/VERIFYING.md.
"""

import getpass
import sys
from datetime import UTC, datetime
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_date, parse_datetime
from django.utils.timezone import is_naive

from citadel.audit.models import LegalHold
from citadel.core.exceptions import CitadelError


def _moment(text: str) -> datetime:
    """An ISO-8601 date or date-time; naive ones are UTC."""
    moment = parse_datetime(text)
    if moment is None:
        day = parse_date(text)
        if day is None:
            raise CommandError(f"{text!r} is not an ISO-8601 date or time (e.g. 2026-01-31 or 2026-01-31T12:00:00Z).")
        moment = datetime(day.year, day.month, day.day)
    return moment.replace(tzinfo=UTC) if is_naive(moment) else moment


def _cli_actor():
    from citadel.audit.services import Actor

    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = "unknown"
    return Actor.system(f"cli ({who})")


class Command(BaseCommand):
    help = "Verify, export and maintain the hash-chained audit log."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="subcommand", required=True)
        verify = sub.add_parser("verify", help="Check every hash, link and signature; exit 1 naming the first "
                                "failing sequence number.")
        verify.add_argument("--public-key", help="Trust only this Ed25519 public key (PEM or base64), e.g. the "
                            "one you were given out of band, instead of the configured keys.")
        export = sub.add_parser("export", help="Export records with hashes, checkpoints and public keys.")
        export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
        export.add_argument("--since", type=_moment, help="Records at or after this time (ISO-8601, UTC if naive).")
        export.add_argument("--until", type=_moment, help="Records before this time.")
        export.add_argument("--actor", default="", help="Actor id or label, e.g. a username.")
        export.add_argument("--action", default="", help="Action, e.g. api_key.create; a trailing * matches a prefix.")
        export.add_argument("--outcome", default="", choices=["", "success", "failure", "denied"])
        export.add_argument("--out", help="File to write; standard output when absent.")
        checkpoint = sub.add_parser("checkpoint", help="Sign the chain's head now.")
        checkpoint.add_argument("--force", action="store_true", help="Sign even if the head is already signed.")
        sub.add_parser("public-key", help="Print the public key that verifies checkpoints (PEM and base64).")
        sub.add_parser("keygen", help="Print a new private key for CITADEL_AUDIT_SIGNING_KEY.")
        purge = sub.add_parser(
            "purge", help="Delete records past their retention that no legal hold covers: older than N days, or "
                          "past their data class's audit_retention_days where the class sets one.")
        purge.add_argument("--older-than-days", type=int,
                           help="retention of records of no data class or of a class without its own "
                                "(default: CITADEL_AUDIT_RETENTION_DAYS; 0: forever)")
        hold = sub.add_parser("hold", help="Legal holds: records they match are never purged.")
        hold_sub = hold.add_subparsers(dest="hold_action", required=True)
        add = hold_sub.add_parser("add", help="Hold records matching every criterion given.")
        add.add_argument("--reason", required=True)
        add.add_argument("--actor-id", default="")
        add.add_argument("--target-type", default="")
        add.add_argument("--target-id", default="")
        add.add_argument("--request-id", default="")
        add.add_argument("--since", type=_moment)
        add.add_argument("--until", type=_moment)
        hold_sub.add_parser("list", help="List legal holds.")
        release = hold_sub.add_parser("release", help="Release a hold by its id.")
        release.add_argument("hold_id", type=int)

    def handle(self, *args, subcommand, **options):
        try:
            getattr(self, f"_{subcommand.replace('-', '_')}")(**options)
        except CitadelError as error:
            raise CommandError(error.message) from error

    def _verify(self, *, public_key=None, **_):
        from citadel.audit.signing import key_id, parse_public_key
        from citadel.audit.verification import chain_verify

        trusted = None
        if public_key:
            try:
                key = parse_public_key(Path(public_key).read_text() if _is_file(public_key) else public_key)
            except ValueError as error:
                raise CommandError(f"--public-key is not an Ed25519 public key: {error}") from error
            trusted = {key_id(key): key}
        result = chain_verify(trusted_keys=trusted)
        if result.ok:
            self.stdout.write(f"OK: {result.summary()}")
            return
        problem = result.first_problem
        self.stderr.write(f"FAILED at sequence {problem.sequence}: {problem.reason}: {problem.message}")
        for other in sorted(result.problems, key=lambda p: p.sequence)[1:6]:
            self.stderr.write(f"  also at sequence {other.sequence}: {other.reason}: {other.message}")
        sys.exit(1)

    def _export(self, *, format, since=None, until=None, actor="", action="", outcome="", out=None, **_):
        from citadel.audit.export import audit_export

        kwargs = dict(fmt=format, actor=_cli_actor(), since=since, until=until, actor_filter=actor,
                      action=action, outcome=outcome)
        if out:
            with open(out, "w", encoding="utf-8", newline="") as handle:
                count = audit_export(out=handle, **kwargs)
            self.stderr.write(f"Exported {count} records to {out}")
        else:
            audit_export(out=self.stdout, **kwargs)

    def _checkpoint(self, *, force=False, **_):
        from citadel.audit.services import checkpoint_create

        checkpoint = checkpoint_create(force=force)
        if checkpoint is None:
            self.stdout.write("Nothing to sign: the log is empty or its head is already signed.")
        else:
            self.stdout.write(f"Signed record {checkpoint.sequence} ({checkpoint.record_hash}) "
                              f"with key {checkpoint.key_id}")

    def _public_key(self, **_):
        from citadel.audit.signing import key_id, public_key_b64, public_key_pem

        key = public_key_b64()
        self.stdout.write(public_key_pem(key).rstrip())
        self.stdout.write(f"base64: {key}")
        self.stdout.write(f"key id: {key_id(key)}")

    def _keygen(self, **_):
        from citadel.audit.signing import generate_key_text

        self.stdout.write(generate_key_text())

    def _purge(self, *, older_than_days, **_):
        from django.conf import settings

        from citadel.audit.services import audit_purge, checkpoint_create

        if older_than_days is None:
            older_than_days = settings.CITADEL_AUDIT_RETENTION_DAYS

        checkpoint_create()
        purge = audit_purge(older_than_days=older_than_days, actor=_cli_actor())
        if purge is None:
            self.stdout.write("Nothing to purge.")
        else:
            self.stdout.write(f"Purged {purge.deleted_count} records below sequence {purge.boundary_sequence}; "
                              f"kept {len(purge.retained)} under legal hold or their data class's longer "
                              "retention.")

    def _hold(self, *, hold_action, **options):
        from citadel.audit.services import legal_hold_create, legal_hold_release

        if hold_action == "add":
            hold = legal_hold_create(actor=_cli_actor(), **{k: options[k] for k in (
                "reason", "actor_id", "target_type", "target_id", "request_id", "since", "until")})
            self.stdout.write(f"Legal hold {hold.pk} placed.")
        elif hold_action == "release":
            legal_hold_release(hold_id=options["hold_id"], actor=_cli_actor())
            self.stdout.write(f"Legal hold {options['hold_id']} released.")
        else:
            for hold in LegalHold.objects.all():
                criteria = ", ".join(f"{name}={getattr(hold, name)}" for name in (
                    "actor_id", "target_type", "target_id", "request_id", "since", "until") if getattr(hold, name))
                state = f"released {hold.released_at:%Y-%m-%d}" if hold.released_at else "active"
                self.stdout.write(f"{hold.pk}\t{state}\t{hold.reason}\t{criteria or 'everything'}")


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except OSError:
        return False
