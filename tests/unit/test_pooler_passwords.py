"""Client password verifiers: Perseus's scrypt hash (easy-scrypt), PostgreSQL's SCRAM and md5.

The scrypt layout is checked against easy-scrypt's DerivePassphrase as its source writes it
(key | salt | N r p as int32 little-endian | SHA-256 of all that, base64), with a fixed salt so
the value is a known vector; hashlib's scrypt itself is checked against RFC 7914. The SCRAM and
md5 forms are compared with what a real PostgreSQL stores for the same password.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import uuid

import pytest
from scramp import ScramClient, ScramMechanism

from outpost.pooler.passwords import (
    PasswordFormatError,
    check_scrypt_hash,
    make_client_secret,
    md5_secret,
    parse_scram_verifier,
    scram_verifier,
    scrypt_hash,
    verify_scrypt,
)

SALT = bytes(range(16))
#: scrypt_hash("test", salt=bytes(range(16))): easy-scrypt's DerivePassphrase("test", 32) with
#: that salt, computed once from the layout below and kept as a regression vector.
KNOWN = (
    "teIV2TBNBSfmdzbjsvV6IHzmVyVG6K8lT0d2XW5jQGkAAQIDBAUGBwgJCgsMDQ4PAEAAAAgAAAABAAAAxZ+hh9f5"
    "jBItjs+azjk7jeX5owYh84JBtVyGNQCJv/A="
)


def easy_scrypt(
    password: str, salt: bytes, n: int = 16384, r: int = 8, p: int = 1, keylen: int = 32
) -> str:
    """DerivePassphrase rewritten line by line from easy-scrypt's scrypt.go, for comparison."""
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=keylen, maxmem=2**27)
    key += salt
    key += b"".join(struct.pack("<i", v) for v in (n, r, p))
    key += hashlib.sha256(key).digest()
    return base64.b64encode(key).decode()


def test_hashlib_scrypt_matches_rfc7914() -> None:
    derived = hashlib.scrypt(b"password", salt=b"NaCl", n=1024, r=8, p=16, dklen=64)
    assert derived.hex().startswith(
        "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"
    )


def test_scrypt_hash_is_easy_scrypt_derive_passphrase() -> None:
    hashed = scrypt_hash("test", salt=SALT)
    assert hashed == easy_scrypt("test", SALT)
    assert hashed == KNOWN
    raw = base64.b64decode(hashed)
    assert len(raw) == 32 + 60  # keylen + 60, as easy-scrypt documents
    assert raw[32:48] == SALT
    assert struct.unpack("<iii", raw[48:60]) == (16384, 8, 1)
    assert raw[60:] == hashlib.sha256(raw[:60]).digest()


def test_random_salt_and_verify() -> None:
    first, second = scrypt_hash("s3cret"), scrypt_hash("s3cret")
    assert first != second  # a fresh salt each time
    assert verify_scrypt("s3cret", first) and verify_scrypt("s3cret", second)
    assert not verify_scrypt("s3cret!", first)
    assert verify_scrypt("test", KNOWN) and not verify_scrypt("Test", KNOWN)


def test_verify_reads_parameters_and_key_length_from_the_hash() -> None:
    # easy-scrypt's VerifyPassphrase takes keylen = len - 60 and N, r, p from the hash
    other = easy_scrypt("pw", SALT, n=1024, r=4, p=2, keylen=34)
    assert verify_scrypt("pw", other)
    assert not verify_scrypt("px", other)
    check_scrypt_hash(other)


def test_malformed_and_tampered_hashes_fail_cleanly() -> None:
    raw = bytearray(base64.b64decode(KNOWN))
    raw[-1] ^= 1  # checksum broken
    tampered = base64.b64encode(bytes(raw)).decode()
    assert not verify_scrypt("test", tampered)
    with pytest.raises(PasswordFormatError, match="SHA-256"):
        check_scrypt_hash(tampered)
    for bad in ("not base64!", base64.b64encode(b"short").decode(), ""):
        assert not verify_scrypt("test", bad)
        with pytest.raises(PasswordFormatError):
            check_scrypt_hash(bad)
    greedy = easy_scrypt("pw", SALT, n=2, r=1, p=1)
    raw = bytearray(base64.b64decode(greedy))
    raw[48:52] = struct.pack("<i", 1 << 30)  # would need 1 TiB of memory
    with pytest.raises(PasswordFormatError, match="excessive"):
        check_scrypt_hash(base64.b64encode(bytes(raw)).decode())


def test_md5_secret_is_postgres_form() -> None:
    assert md5_secret("pw", "alice") == "md5aa7bb6fc2700e717ae61ec5c1567469c"


def test_scram_verifier_authenticates_a_scram_client() -> None:
    verifier = scram_verifier("correct horse")
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    auth_info = parse_scram_verifier(verifier)
    mechanism = ScramMechanism("SCRAM-SHA-256")

    def login(password: str) -> bool:
        server = mechanism.make_server(lambda _user: auth_info)
        client = ScramClient(["SCRAM-SHA-256"], "alice", password)
        server.set_client_first(client.get_client_first())
        client.set_server_first(server.get_server_first())
        try:
            server.set_client_final(client.get_client_final())
        except Exception:
            return False
        client.set_server_final(server.get_server_final())
        return True

    assert login("correct horse")
    assert not login("wrong horse")
    with pytest.raises(PasswordFormatError):
        parse_scram_verifier("md5abc")


def test_make_client_secret_has_every_form_and_hides_them() -> None:
    secret = make_client_secret("pw-1", "bob")
    assert secret.scram and secret.scram.startswith("SCRAM-SHA-256$")
    assert secret.scrypt and verify_scrypt("pw-1", secret.scrypt)
    assert secret.md5 == md5_secret("pw-1", "bob")
    assert "pw-1" not in repr(secret) and secret.md5 not in repr(secret)
    with pytest.raises(ValueError):
        make_client_secret("", "bob")


@pytest.mark.integration
@pytest.mark.parametrize("password", ["plain-pw", "pässwörd ünïcode"])
def test_verifiers_equal_what_postgresql_stores(pg_dsn: str, password: str) -> None:
    import psycopg

    role = f"outpost_pw_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        try:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"CREATE ROLE {role} PASSWORD '{password}'")
            stored = conn.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)
            ).fetchone()
            assert stored is not None
            salt, _, _, iterations = parse_scram_verifier(stored[0])
            assert scram_verifier(password, salt=salt, iterations=iterations) == stored[0]

            conn.execute("SET password_encryption = 'md5'")
            conn.execute(f"ALTER ROLE {role} PASSWORD '{password}'")
            stored = conn.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)
            ).fetchone()
            assert stored is not None and md5_secret(password, role) == stored[0]
        finally:
            conn.execute(f"DROP ROLE IF EXISTS {role}")
