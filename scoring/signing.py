"""Ed25519 signatures of bundle manifests: authenticity, not only integrity.

The manifest lists the SHA-256 of every other file of a bundle, and the loader refuses a
file whose hash differs, so the manifest's exact bytes stand for the whole bundle. A
hash in the same folder only proves the files agree with each other; a signature by a key
kept off the serving machine proves who made them. So:

- the builder (``python -m training sign``, or :func:`sign_bundle`) signs manifest.json's
  bytes with an Ed25519 private key and writes ``manifest.sig`` beside it;
- the service, configured with the public key (``GRADUNC_BUNDLE_PUBLIC_KEY``), verifies
  the signature over the very bytes it then parses, before any other file of the bundle
  is read (and long before the heads are unpickled); an unsigned bundle, a signature by
  another key and a manifest changed after signing are all refused.

``manifest.sig`` is JSON: ``{"algorithm": "ed25519", "key_id": <first 16 hex digits of the
SHA-256 of the raw public key>, "signature": <base64 of the 64-byte signature>}``. Keys
are PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key), as written by
:func:`generate_key_pair` or ``openssl genpkey -algorithm ed25519``. No torch here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from scoring.bundle import MANIFEST_NAME, BundleError

__all__ = [
    "SIGNATURE_NAME",
    "SignatureError",
    "check_signature",
    "generate_key_pair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "require_signature",
    "required_public_key",
    "sign_bundle",
    "verify_manifest",
]

SIGNATURE_NAME = "manifest.sig"
ALGORITHM = "ed25519"

#: The public key that :func:`scoring.bundle.load_bundle` verifies against when its caller
#: passes none: set for one load by :func:`require_signature` (the service's loader), so
#: the key reaches the loader through code that knows nothing of signatures.
_REQUIRED_KEY: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "gradunc_required_public_key", default=None
)


class SignatureError(BundleError):
    """The bundle's signature is missing, malformed, by another key, or does not match."""


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SignatureError(f"cannot read the {what} {path}: {error.strerror}") from None


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; SignatureError naming the file otherwise."""
    try:
        key = serialization.load_pem_public_key(_read_pem(Path(path), "public key"))
    except ValueError as error:
        raise SignatureError(f"{path}: not a PEM public key ({error})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from an unencrypted PEM file (PKCS#8)."""
    try:
        key = serialization.load_pem_private_key(
            _read_pem(Path(path), "private key"), password=None
        )
    except (ValueError, TypeError) as error:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key, to tell keys apart in messages."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key_pair(private_path: str | Path, public_path: str | Path) -> str:
    """Write a new Ed25519 key pair as PEM files; the private one readable by its owner
    only. Refuses to overwrite either file. Returns the key id."""
    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists already; not overwriting a key")
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_key = private_key.public_key()
    public_path.write_bytes(
        public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_id(public_key)


def sign_bundle(bundle_dir: str | Path, private_key_path: str | Path) -> Path:
    """Sign ``bundle_dir``'s manifest.json; write and return ``manifest.sig``.

    Sign after the manifest is final: any later change to manifest.json (a rebuild, a
    hand edit) makes the signature fail.
    """
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: no bundle manifest to sign")
    private_key = load_private_key(private_key_path)
    signature = private_key.sign(manifest_path.read_bytes())
    record = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    signature_path = bundle_dir / SIGNATURE_NAME
    signature_path.write_text(json.dumps(record, indent=2) + "\n")
    signature_path.chmod(0o644)
    return signature_path


def verify_manifest(bundle_dir: str | Path, manifest_bytes: bytes, public_key_path: Path) -> None:
    """Check that ``manifest_bytes`` (manifest.json as read) carry a valid signature in
    ``bundle_dir/manifest.sig`` by the key in ``public_key_path``.

    Raises
    ------
    SignatureError
        No signature file, a malformed one, another algorithm, a signature by another key,
        or one that does not match these bytes.
    """
    public_key = load_public_key(public_key_path)
    expected_id = key_id(public_key)
    signature_path = Path(bundle_dir) / SIGNATURE_NAME
    if not signature_path.is_file():
        raise SignatureError(
            f"{signature_path}: the bundle is not signed, and a signature by key "
            f"{expected_id} is required (GRADUNC_BUNDLE_PUBLIC_KEY); sign it with "
            "python -m training sign"
        )
    try:
        record = json.loads(signature_path.read_text())
        algorithm, signer, encoded = record["algorithm"], record["key_id"], record["signature"]
        signature = base64.b64decode(encoded, validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        raise SignatureError(f"{signature_path}: not a valid signature file ({error})") from None
    if algorithm != ALGORITHM:
        raise SignatureError(f"{signature_path}: algorithm {algorithm!r}, expected {ALGORITHM!r}")
    if signer != expected_id:
        raise SignatureError(
            f"{signature_path}: signed by key {signer}, but key {expected_id} is required "
            "(GRADUNC_BUNDLE_PUBLIC_KEY)"
        )
    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(
            f"{signature_path}: the signature does not match {MANIFEST_NAME} (changed after "
            "signing?); refusing to load the bundle"
        ) from None


def required_public_key() -> Path | None:
    """The public key :func:`require_signature` set for the current load, if any."""
    return _REQUIRED_KEY.get()


@contextlib.contextmanager
def require_signature(public_key_path: Path | None) -> Iterator[None]:
    """Within the block, :func:`scoring.bundle.load_bundle` requires a signature by this
    key (None: no requirement)."""
    token = _REQUIRED_KEY.set(public_key_path)
    try:
        yield
    finally:
        _REQUIRED_KEY.reset(token)


def check_signature(
    bundle_dir: str | Path, manifest_bytes: bytes, public_key_path: Path | None = None
) -> None:
    """What :func:`scoring.bundle.load_bundle` calls first: verify the manifest against
    ``public_key_path``, else against the key :func:`require_signature` set; no key, no
    requirement."""
    key = public_key_path if public_key_path is not None else required_public_key()
    if key is not None:
        verify_manifest(bundle_dir, manifest_bytes, key)
