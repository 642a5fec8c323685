"""Bundle signing (issue "Hardening, round 2", item 6): Ed25519 over the manifest's bytes.

A bundle copy is signed with a fresh key; the loader, given the public key, accepts it,
and refuses an unsigned copy, one signed by another key, one whose manifest changed after
signing and a malformed signature, each before any other file is read. The service, given
``GRADUNC_BUNDLE_PUBLIC_KEY``, does the same and stays unready with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scoring.bundle import MANIFEST_NAME, load_bundle
from scoring.signing import (
    SIGNATURE_NAME,
    SignatureError,
    generate_key_pair,
    key_id,
    load_public_key,
    require_signature,
    sign_bundle,
)
from tools.harness import REPO_ROOT, ServerProcess


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    generate_key_pair(folder / "signing.pem", folder / "signing.pub")
    return folder / "signing.pem", folder / "signing.pub"


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def test_a_signed_bundle_loads_with_its_public_key(bundle_copy, keys) -> None:
    private_key, public_key = keys
    signature = sign_bundle(bundle_copy, private_key)
    assert signature == bundle_copy / SIGNATURE_NAME
    record = json.loads(signature.read_text())
    assert record["algorithm"] == "ed25519"
    assert record["key_id"] == key_id(load_public_key(public_key))
    assert load_bundle(bundle_copy, public_key=public_key).path == bundle_copy
    with require_signature(public_key):  # how the service passes the key
        assert load_bundle(bundle_copy).path == bundle_copy


def test_the_private_key_file_is_private_and_never_overwritten(keys) -> None:
    private_key, public_key = keys
    assert private_key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError, match="exists already"):
        generate_key_pair(private_key, public_key.with_name("other.pub"))


def test_an_unsigned_bundle_is_refused_when_a_key_is_configured(bundle_copy, keys) -> None:
    _, public_key = keys
    message = f"{bundle_copy / SIGNATURE_NAME}: the bundle is not signed"
    with pytest.raises(SignatureError, match=re.escape(message)):
        load_bundle(bundle_copy, public_key=public_key)
    with require_signature(public_key), pytest.raises(SignatureError, match="not signed"):
        load_bundle(bundle_copy)
    assert load_bundle(bundle_copy).path == bundle_copy  # no key, no requirement


def test_a_bundle_signed_by_another_key_is_refused(bundle_copy, keys, tmp_path) -> None:
    _, public_key = keys
    other = generate_key_pair(tmp_path / "other.pem", tmp_path / "other.pub")
    sign_bundle(bundle_copy, tmp_path / "other.pem")
    expected = key_id(load_public_key(public_key))
    message = f"signed by key {other}, but key {expected} is required"
    with pytest.raises(SignatureError, match=re.escape(message)):
        load_bundle(bundle_copy, public_key=public_key)


def test_a_manifest_changed_after_signing_is_refused(bundle_copy, keys) -> None:
    private_key, public_key = keys
    sign_bundle(bundle_copy, private_key)
    manifest_path = bundle_copy / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    # The attack signing exists for: swap a file and its hash together.
    manifest["files"][0]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(SignatureError, match="the signature does not match manifest.json"):
        load_bundle(bundle_copy, public_key=public_key)
    manifest_path.write_bytes(manifest_path.read_bytes() + b" ")  # even whitespace counts
    with pytest.raises(SignatureError, match="does not match"):
        load_bundle(bundle_copy, public_key=public_key)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("not json", "not a valid signature file"),
        ('{"algorithm": "ed25519"}', "not a valid signature file"),
        ('{"algorithm": "ed25519", "key_id": "x", "signature": "%%%"}', "not a valid signature"),
        ('{"algorithm": "rsa", "key_id": "x", "signature": "AAAA"}', "algorithm 'rsa'"),
    ],
)
def test_a_malformed_signature_file_is_refused(bundle_copy, keys, content, fragment) -> None:
    _, public_key = keys
    (bundle_copy / SIGNATURE_NAME).write_text(content)
    with pytest.raises(SignatureError, match=re.escape(fragment)):
        load_bundle(bundle_copy, public_key=public_key)


def test_a_key_that_is_not_an_ed25519_public_key_is_named(bundle_copy, keys, tmp_path) -> None:
    private_key, _ = keys
    with pytest.raises(SignatureError, match="not a PEM public key"):
        load_bundle(bundle_copy, public_key=private_key)
    with pytest.raises(SignatureError, match="cannot read the public key"):
        load_bundle(bundle_copy, public_key=tmp_path / "missing.pub")


def test_the_cli_makes_keys_and_signs(bundle_copy, tmp_path) -> None:
    def training(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "training", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    made = training(
        "keygen", "--private-key", str(tmp_path / "k.pem"), "--public-key", str(tmp_path / "k.pub")
    )
    assert made.returncode == 0, made.stderr
    signed = training("sign", str(bundle_copy), "--key", str(tmp_path / "k.pem"))
    assert signed.returncode == 0, signed.stderr
    assert load_bundle(bundle_copy, public_key=tmp_path / "k.pub").path == bundle_copy
    refused = training("sign", str(bundle_copy), "--key", str(tmp_path / "k.pub"))
    assert refused.returncode == 2 and "not an unencrypted PEM private key" in refused.stderr


def test_the_service_refuses_an_unsigned_bundle_and_serves_a_signed_one(
    bundle_copy, keys, tmp_path
) -> None:
    private_key, public_key = keys
    settings = {"bundle_public_key": public_key, "store_enabled": "false"}
    with ServerProcess(bundle_copy, tmp_path / "unsigned.log", settings) as server:
        status, body = server.wait_settled()
        assert status == 503 and body["state"] == "failed", body
        assert "SignatureError" in body["detail"] and "the bundle is not signed" in body["detail"]
        assert str(tmp_path) not in body["detail"]  # no absolute path in an answer
    sign_bundle(bundle_copy, private_key)
    with ServerProcess(bundle_copy, tmp_path / "signed.log", settings) as server:
        assert server.wait_ready()["model_version"]
