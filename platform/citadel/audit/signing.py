"""The Ed25519 key that signs audit checkpoints and purge manifests, and signature checks.

The private key comes from CITADEL_AUDIT_SIGNING_KEY (PEM PKCS#8, or base64 of the 32-byte
seed that `citadel audit keygen` prints). Local and test settings may instead name a file
(CITADEL_AUDIT_SIGNING_KEY_FILE) that is created with mode 0600 on first use; production has
no default, so a missing key fails at start. Verifiers trust the current key's public half plus
CITADEL_AUDIT_TRUSTED_PUBLIC_KEYS (older keys after a rotation), or only a key given to them.
"""

import base64
import binascii
import hashlib
import os
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from citadel.audit.chain import canonical_json


def _raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_b64: str) -> str:
    return hashlib.sha256(base64.b64decode(public_b64)).hexdigest()[:32]


def generate_key_text() -> str:
    """A new private key as base64 of its 32-byte seed (what CITADEL_AUDIT_SIGNING_KEY takes)."""
    raw = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return base64.b64encode(raw).decode()


@lru_cache(maxsize=4)
def _parse_private(text: str) -> Ed25519PrivateKey:
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("not an Ed25519 key")
            return key
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error) as error:
        raise ImproperlyConfigured(
            "CITADEL_AUDIT_SIGNING_KEY is not an Ed25519 private key (PEM, or base64 of 32 bytes); "
            f"make one with `citadel audit keygen`: {error}") from None


def _key_file_text(path: Path) -> str:
    """The key kept in `path`, made (mode 0600) on first use; safe when processes race to make it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(generate_key_text() + "\n")
    return path.read_text()


def signing_key() -> Ed25519PrivateKey:
    text = getattr(settings, "CITADEL_AUDIT_SIGNING_KEY", "")
    if not text:
        path = getattr(settings, "CITADEL_AUDIT_SIGNING_KEY_FILE", None)
        if not path:
            raise ImproperlyConfigured("Set CITADEL_AUDIT_SIGNING_KEY to sign the audit log "
                                       "(make one with `citadel audit keygen`).")
        text = _key_file_text(Path(path))
    return _parse_private(text)


def public_key_b64(private: Ed25519PrivateKey | None = None) -> str:
    return base64.b64encode(_raw_public((private or signing_key()).public_key())).decode()


def public_key_pem(public_b64: str) -> str:
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64))
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def parse_public_key(text: str) -> str:
    """A public key given as PEM or base64 of its 32 raw bytes, as base64 of the raw bytes."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        public = serialization.load_pem_public_key(text.encode())
        if not isinstance(public, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return base64.b64encode(_raw_public(public)).decode()
    raw = base64.b64decode(text, validate=True)
    Ed25519PublicKey.from_public_bytes(raw)  # raises ValueError when it is not 32 bytes
    return text


def trusted_public_keys() -> dict[str, str]:
    """key_id -> public key (base64) of every key whose signatures the verifier accepts."""
    keys = [public_key_b64(), *getattr(settings, "CITADEL_AUDIT_TRUSTED_PUBLIC_KEYS", [])]
    return {key_id(key): key for key in (parse_public_key(k) for k in keys)}


def sign(payload: dict) -> tuple[str, str, str]:
    """(key_id, public key, signature), all text, for a payload in the chain's JSON encoding."""
    private = signing_key()
    public = public_key_b64(private)
    signature = base64.b64encode(private.sign(canonical_json(payload))).decode()
    return key_id(public), public, signature


def signature_valid(public_b64: str, payload: dict, signature_b64: str) -> bool:
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64))
        public.verify(base64.b64decode(signature_b64), canonical_json(payload))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True
