"""Verifying the audit log from its rows: every hash, every link, every signature.

The chain is checked in sequence order: each record's hash is recomputed from its columns
(chain.py), its prev_hash must be the previous record's hash, and sequence numbers must run
without gaps. Checkpoints and purge manifests must carry a valid Ed25519 signature by a trusted
key, and each checkpoint must match the record it signed (so rewriting a record and re-hashing
everything after it is caught, and so is deleting the newest records). After a retention purge
the chain starts at the latest manifest's boundary, linking to the hash the manifest signed,
and the held records kept below it must be exactly those the manifest lists.
"""

from dataclasses import dataclass, field

from citadel.audit import chain
from citadel.audit.models import AuditCheckpoint, AuditPurge, AuditRecord
from citadel.audit.services import checkpoint_payload, purge_payload


@dataclass(frozen=True)
class Problem:
    sequence: int
    reason: str  # hash_mismatch, broken_link, missing_sequence, bad_signature, untrusted_key, ...
    message: str


@dataclass
class Verification:
    records: int = 0
    checkpoints: int = 0
    purges: int = 0
    first_sequence: int | None = None
    last_sequence: int | None = None
    last_signed_sequence: int | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return min(self.problems, key=lambda p: p.sequence) if self.problems else None

    def summary(self) -> str:
        problem = self.first_problem
        if problem is not None:
            return f"sequence {problem.sequence}: {problem.reason}: {problem.message}"
        if not self.records:
            return "the audit log is empty"
        signed = (f"signed up to {self.last_signed_sequence}" if self.last_signed_sequence is not None
                  else "no checkpoint yet")
        return (f"{self.records} records (sequence {self.first_sequence} to {self.last_sequence}), "
                f"{self.checkpoints} checkpoints and {self.purges} purge manifests verified; {signed}")


def _check_signatures(rows, payload_of, trusted: dict[str, str], what: str, sequence_of, result) -> list:
    good = []
    for row in rows:
        sequence = sequence_of(row)
        if trusted.get(row.key_id) != row.public_key:
            result.problems.append(Problem(sequence, "untrusted_key",
                                           f"{what} {row.pk} is signed by key {row.key_id}, which is not trusted"))
        elif not _signature_valid(row.public_key, payload_of(row), row.signature):
            result.problems.append(Problem(sequence, "bad_signature",
                                           f"{what} {row.pk}: the Ed25519 signature does not verify"))
        else:
            good.append(row)
    return good


def _signature_valid(public_key: str, payload: dict, signature: str) -> bool:
    from citadel.audit.signing import signature_valid

    return signature_valid(public_key, payload, signature)


def chain_verify(*, trusted_keys: dict[str, str] | None = None) -> Verification:
    """Check the whole log. `trusted_keys` (key_id -> base64 public key) defaults to the configured ones."""
    if trusted_keys is None:
        from citadel.audit.signing import trusted_public_keys

        trusted_keys = trusted_public_keys()
    result = Verification()

    purges = _check_signatures(
        list(AuditPurge.objects.order_by("boundary_sequence", "id")), purge_payload, trusted_keys,
        "purge manifest", lambda p: p.boundary_sequence, result)
    result.purges = len(purges)
    purge = purges[-1] if purges else None
    boundary = purge.boundary_sequence if purge else 1
    expected, prev_hash = boundary, (purge.boundary_prev_hash if purge else chain.GENESIS_HASH)
    retained = {int(s): h for s, h in purge.retained} if purge else {}

    checkpoints = list(AuditCheckpoint.objects.order_by("sequence", "id"))
    result.checkpoints = len(checkpoints)
    signed = _check_signatures(
        checkpoints, lambda c: checkpoint_payload(sequence=c.sequence, record_hash=c.record_hash,
                                                  created_at=c.created_at),
        trusted_keys, "checkpoint", lambda c: c.sequence, result)
    wanted = {c.sequence for c in signed}
    hashes: dict[int, str] = {}
    broken_at = None

    rows = AuditRecord.objects.order_by("sequence").values_list(*chain.FIELDS, "record_hash")
    for values in rows.iterator(chunk_size=2000):
        row = dict(zip((*chain.FIELDS, "record_hash"), values, strict=True))
        sequence = row["sequence"]
        result.records += 1
        result.first_sequence = sequence if result.first_sequence is None else result.first_sequence
        result.last_sequence = sequence
        computed = chain.record_hash(row)
        if sequence < boundary:  # a record kept under legal hold below the purge boundary
            if sequence not in retained:
                result.problems.append(Problem(sequence, "unexpected_record", f"record {sequence} lies below the "
                                               f"purge boundary {boundary} but the signed manifest does not list it"))
            elif computed != row["record_hash"] or retained.pop(sequence) != computed:
                result.problems.append(Problem(sequence, "hash_mismatch", f"record {sequence} (held below the "
                                               "purge boundary) does not match its hash in the signed manifest"))
            else:
                hashes[sequence] = computed
            continue
        if broken_at is not None:
            continue
        if sequence != expected:
            broken_at = expected
            result.problems.append(Problem(expected, "missing_sequence", f"record {expected} is missing "
                                           f"(after {expected - 1} comes {sequence})"))
        elif computed != row["record_hash"]:
            broken_at = sequence
            result.problems.append(Problem(sequence, "hash_mismatch", f"record {sequence}'s contents do not "
                                           "match its stored hash (the row was changed)"))
        elif row["prev_hash"] != prev_hash:
            broken_at = sequence
            result.problems.append(Problem(sequence, "broken_link", f"record {sequence}'s prev_hash is not the "
                                           f"hash of record {sequence - 1}"))
        else:
            if sequence in wanted:
                hashes[sequence] = computed
            prev_hash, expected = computed, sequence + 1

    for sequence in sorted(retained):
        result.problems.append(Problem(sequence, "missing_sequence", f"record {sequence}, kept under legal hold "
                                       "below the purge boundary, is missing"))
    last_good = (broken_at - 1) if broken_at is not None else expected - 1
    if purge is not None and broken_at is None and expected == boundary:
        result.problems.append(Problem(boundary, "missing_sequence", f"record {boundary}, where the chain "
                                       "continues after the purge, is missing"))
    for checkpoint in signed:
        if checkpoint.sequence < boundary and checkpoint.sequence not in hashes:
            continue  # signed a record that a purge has since removed
        if checkpoint.sequence > last_good:
            if broken_at is None:
                result.problems.append(Problem(last_good + 1, "missing_sequence", f"checkpoint {checkpoint.pk} "
                                               f"signed record {checkpoint.sequence}, but the log ends at {last_good}"))
            continue
        if hashes.get(checkpoint.sequence) != checkpoint.record_hash:
            result.problems.append(Problem(checkpoint.sequence, "checkpoint_mismatch", f"record "
                                           f"{checkpoint.sequence} is not the record signed in checkpoint "
                                           f"{checkpoint.pk} (it or an earlier record was rewritten)"))
        else:
            result.last_signed_sequence = max(result.last_signed_sequence or 0, checkpoint.sequence)
    return result
