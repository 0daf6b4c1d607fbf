"""The association with HQ: URL rules, pinning, once-and-for-good, the sealed token."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import pytest

from outpost.crypto import Key, is_sealed
from outpost.errors import KeyError_
from outpost.link.association import TOKEN_FILE, load_association, load_token
from outpost.link.errors import LinkError
from outpost.link.login import Endpoint, associate, check_url
from outpost.protocol import LoginResponse, generate_signing_key, public_key_b64

KEY = Key(bytes(range(64)), "/agent.key")
OTHER_KEY = Key(bytes(range(1, 65)), "/other.key")


def response(hq_id: str, signing_key: str, name: str = "edge-1") -> LoginResponse:
    return LoginResponse(
        agent_name=name, hq_id=hq_id, signing_key=signing_key, heartbeat_interval=5.0
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://hq.example.com",
        "https://hq.example.com:8443/outpost/",
        "http://127.0.0.1:9700",
        "http://localhost:9700",
        "http://[::1]:9700",
    ],
)
def test_https_anywhere_and_http_on_loopback_are_accepted(url: str) -> None:
    assert check_url(url, allow_insecure=False) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://hq.example.com", "http://10.0.0.5:9700"])
def test_plain_http_off_loopback_needs_allow_insecure(url: str) -> None:
    with pytest.raises(LinkError, match=r"plain HTTP .* set hq.allow_insecure"):
        check_url(url, allow_insecure=False)
    assert check_url(url, allow_insecure=True) == url


@pytest.mark.parametrize("url", ["ftp://hq", "hq.example.com", "https://", "https://h/?x=1"])
def test_what_is_not_an_hq_address_is_refused(url: str) -> None:
    with pytest.raises(LinkError, match=r"hq.url"):
        check_url(url, allow_insecure=False)


def test_missing_ca_file_is_named(tmp_path: Path) -> None:
    endpoint = Endpoint("https://hq.example.com", str(tmp_path / "ca.pem"))
    with pytest.raises(LinkError, match=r"hq.ca_file .*ca.pem does not exist"):
        endpoint.context()


def test_login_pins_the_key_and_seals_the_token(tmp_path: Path) -> None:
    signing = public_key_b64(generate_signing_key())
    hq_id = str(uuid.uuid4())
    endpoint = Endpoint("https://hq.example.com")
    association = associate(tmp_path, KEY, endpoint, "opt_secret", response(hq_id, signing))
    assert association.hq_id == hq_id and association.signing_key == signing
    assert load_association(tmp_path) == association
    raw = (tmp_path / TOKEN_FILE).read_bytes()
    assert is_sealed(raw) and b"opt_secret" not in raw
    assert load_token(tmp_path, KEY) == "opt_secret"
    with pytest.raises(KeyError_, match=r"HQ token in .* different key"):
        load_token(tmp_path, OTHER_KEY)
    for name in ("hq.json", TOKEN_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert "opt_secret" not in (tmp_path / "hq.json").read_text()


def test_without_a_key_the_token_is_stored_plain_but_private(tmp_path: Path) -> None:
    signing = public_key_b64(generate_signing_key())
    associate(tmp_path, None, Endpoint("http://127.0.0.1:1"), "opt_x", response("h", signing))
    assert load_token(tmp_path, None) == "opt_x"
    assert stat.S_IMODE((tmp_path / TOKEN_FILE).stat().st_mode) == 0o600


def test_same_hq_with_a_reissued_token_is_allowed(tmp_path: Path) -> None:
    signing = public_key_b64(generate_signing_key())
    first = associate(tmp_path, KEY, Endpoint("https://a.example"), "opt_1", response("h", signing))
    again = associate(tmp_path, KEY, Endpoint("https://b.example"), "opt_2", response("h", signing))
    assert load_token(tmp_path, KEY) == "opt_2"
    assert again.url == "https://b.example"
    assert again.associated_at == first.associated_at


def test_another_hq_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    signing = public_key_b64(generate_signing_key())
    associate(tmp_path, KEY, Endpoint("https://a.example"), "opt_1", response("hq-a", signing))
    before = json.loads((tmp_path / "hq.json").read_text())
    other = public_key_b64(generate_signing_key())
    with pytest.raises(LinkError) as info:
        associate(tmp_path, KEY, Endpoint("https://b.example"), "opt_2", response("hq-b", other))
    message = str(info.value)
    assert "associated with HQ hq-a" in message and "another HQ (hq-b)" in message
    assert "remove" in message and "hq.json" in message and "hq.token" in message
    assert json.loads((tmp_path / "hq.json").read_text()) == before
    assert load_token(tmp_path, KEY) == "opt_1"


def test_same_hq_id_with_another_signing_key_is_refused(tmp_path: Path) -> None:
    signing = public_key_b64(generate_signing_key())
    associate(tmp_path, KEY, Endpoint("https://a.example"), "opt_1", response("h", signing))
    other = public_key_b64(generate_signing_key())
    with pytest.raises(LinkError, match="another signing key"):
        associate(tmp_path, KEY, Endpoint("https://a.example"), "opt_2", response("h", other))
    assert load_token(tmp_path, KEY) == "opt_1"


def test_a_damaged_association_file_says_how_to_recover(tmp_path: Path) -> None:
    (tmp_path / "hq.json").write_text("{")
    with pytest.raises(LinkError, match=r"damaged; remove .*hq.json.*outpost login"):
        load_association(tmp_path)


def test_key_rotation_reseals_the_hq_token(tmp_path: Path) -> None:
    from outpost.api.service import AgentService
    from outpost.config import AgentConfig, LoadedConfig

    loaded = LoadedConfig(config=AgentConfig(data_dir=tmp_path / "data"), source=None)
    service = AgentService.open(loaded)
    try:
        data_dir = service.store.data_dir
        signing = public_key_b64(generate_signing_key())
        associate(data_dir, None, Endpoint("https://a.example"), "opt_1", response("h", signing))
        service.rotate_key(None, KEY)
        assert is_sealed((data_dir / TOKEN_FILE).read_bytes())
        service.rotate_key(KEY, OTHER_KEY)
        assert load_token(data_dir, OTHER_KEY) == "opt_1"
    finally:
        service.close()
