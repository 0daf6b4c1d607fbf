"""Key files and the sealed envelope."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outpost.crypto import (
    KEY_SIZE,
    Key,
    generate_key_file,
    load_key_file,
    open_sealed,
    seal,
)
from outpost.errors import DecryptionError, KeyError_

KEY = Key(bytes(range(64)), "/test/key")
OTHER = Key(bytes(range(1, 65)), "/test/other")


def test_generate_writes_64_bytes_mode_0400(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    key = generate_key_file(path)
    assert path.stat().st_size == KEY_SIZE
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert load_key_file(path).material == key.material


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    path.write_bytes(b"precious")
    with pytest.raises(KeyError_, match="already exists; refusing to overwrite"):
        generate_key_file(path)
    assert path.read_bytes() == b"precious"


def test_load_rejects_wrong_size_and_missing(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 32)
    with pytest.raises(KeyError_, match="holds 32 bytes but a key is exactly 64"):
        load_key_file(short)
    with pytest.raises(KeyError_, match="does not exist"):
        load_key_file(tmp_path / "missing.key")


@given(st.binary(max_size=2048))
def test_roundtrip(data: bytes) -> None:
    assert open_sealed(KEY, seal(KEY, data)) == data


def test_random_iv_every_time() -> None:
    assert seal(KEY, b"same") != seal(KEY, b"same")


def test_plaintext_not_in_envelope() -> None:
    assert b"hunter2" not in seal(KEY, b'{"password":"hunter2"}')


def test_wrong_key_names_the_key_file() -> None:
    sealed = seal(KEY, b"secret")
    with pytest.raises(KeyError_) as err:
        open_sealed(OTHER, sealed, what="stored options of connection 'db'")
    assert "/test/other" in str(err.value)
    assert "different key" in str(err.value)


@pytest.mark.parametrize("position", [3 + 1 + 8 + 2, 40, -5])
def test_tampered_ciphertext_is_refused(position: int) -> None:
    sealed = bytearray(seal(KEY, b"secret options" * 4))
    sealed[position] ^= 0x01
    with pytest.raises(DecryptionError, match="failed its integrity check"):
        open_sealed(KEY, bytes(sealed))


def test_truncated_envelope_is_refused() -> None:
    sealed = seal(KEY, b"secret options")
    with pytest.raises(DecryptionError):
        open_sealed(KEY, sealed[:-1])
    with pytest.raises(DecryptionError, match="corrupt"):
        open_sealed(KEY, sealed[:20])


def test_key_repr_hides_material() -> None:
    assert bytes(range(64)).hex() not in repr(KEY)
