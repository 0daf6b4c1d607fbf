"""The pooler's frontend parsing: startup packets, tenant schema, framing; fuzzed with
hypothesis (random bytes either parse or raise ProtocolViolation, never anything else)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outpost.pooler import protocol as p
from outpost.pooler.auth import choose_method
from outpost.pooler.routes import ClientSecret


def _startup(**params: str) -> bytes:
    body = struct.pack("!i", p.PROTOCOL_V3)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    return body + b"\0"


def test_startup_message_parameters() -> None:
    msg = p.parse_startup(_startup(user="alice", database="app", application_name="psql"))
    assert msg == p.StartupMessage(
        p.PROTOCOL_V3, {"user": "alice", "database": "app", "application_name": "psql"}
    )


def test_ssl_gssenc_and_cancel_requests() -> None:
    assert p.parse_startup(struct.pack("!i", p.SSL_REQUEST)) == p.SSLRequest()
    assert p.parse_startup(struct.pack("!i", p.GSSENC_REQUEST)) == p.GSSENCRequest()
    cancel = p.cancel_request(0x1000002, -5)[4:]
    assert p.parse_startup(cancel) == p.CancelRequest(0x1000002, -5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\0\0", "too short"),
        (struct.pack("!i", 0x00020000), "unsupported frontend protocol 2.0"),
        (struct.pack("!i", p.PROTOCOL_V3) + b"user\0alice", "not terminated"),
        (struct.pack("!i", p.PROTOCOL_V3) + b"user\0\0\0", "no PostgreSQL user name"),
        (struct.pack("!i", p.PROTOCOL_V3) + b"user\0a\0odd\0\0", "without a value"),
        (struct.pack("!i", p.PROTOCOL_V3) + b"user\0\xff\0\0", "not valid UTF-8"),
        (struct.pack("!ii", p.CANCEL_REQUEST, 1), "cancel request has the wrong length"),
    ],
)
def test_bad_startup_packets(body: bytes, message: str) -> None:
    with pytest.raises(p.ProtocolViolation, match=message):
        p.parse_startup(body)


@pytest.mark.parametrize("length", [0, 7, p.MAX_STARTUP_LENGTH + 1, -1])
def test_startup_length_limits(length: int) -> None:
    with pytest.raises(p.ProtocolViolation, match="invalid startup packet length"):
        p.parse_startup_length(struct.pack("!i", length))


@pytest.mark.parametrize(
    ("params", "schema"),
    [
        ({}, None),
        ({"schema_search_path": "tenant_a"}, "tenant_a"),
        ({"options": "-csearch_path=tenant_b"}, "tenant_b"),
        ({"options": "-c search_path=tenant_c,public"}, "tenant_c"),
        ({"options": "--search_path=x -c statement_timeout=5"}, "x"),
        ({"options": r"-csearch_path=my\ schema"}, "my schema"),
        ({"options": '-csearch_path="Quoted""Name"'}, 'Quoted"Name'),
        ({"search_path": "from_asyncpg"}, "from_asyncpg"),
        ({"schema_search_path": "wins", "options": "-csearch_path=loses"}, "wins"),
        ({"options": "-c statement_timeout=5"}, None),
    ],
)
def test_tenant_schema_from_startup_parameters(params: dict[str, str], schema: str | None) -> None:
    assert p.schema_from_params(params) == schema


@pytest.mark.parametrize(
    ("options", "settings"),
    [
        ("", {}),
        ("-c TimeZone=UTC", {"timezone": "UTC"}),
        ("-cDateStyle=ISO,DMY --client-encoding=LATIN1", {"datestyle": "ISO,DMY",
                                                          "client_encoding": "LATIN1"}),
        (r"-c application_name=my\ app -c geqo", {"application_name": "my app"}),
        ("-c timezone=UTC -c TimeZone=Europe/Paris", {"timezone": "Europe/Paris"}),
        ("-B 100 -c search_path=a,b", {"search_path": "a,b"}),
        ("-c", {}),
    ],
)  # fmt: skip
def test_settings_from_options(options: str, settings: dict[str, str]) -> None:
    """Every ``-c name=value`` in libpq's options, as PostgreSQL reads them (names in any case,
    ``-`` for ``_``, backslash-escaped spaces, a later one winning)."""
    assert p.settings_from_options(options) == settings


def test_iter_frames_splits_whole_messages_and_keeps_the_rest() -> None:
    data = p.query("SELECT 1") + p.SYNC + p.query("SELECT 2")[:6]
    frames, used = p.iter_frames(data)
    assert frames == [(p.F_QUERY, b"SELECT 1\0"), (p.F_SYNC, b"")]
    assert used == len(p.query("SELECT 1")) + 5


@pytest.mark.parametrize("length", [0, 3, p.MAX_MESSAGE_LENGTH + 1])
def test_iter_frames_rejects_bad_lengths(length: int) -> None:
    with pytest.raises(p.ProtocolViolation, match="invalid message length"):
        p.iter_frames(b"Q" + struct.pack("!I", length) + b"x")


def test_error_response_round_trip() -> None:
    raw = p.error_response("28P01", 'password authentication failed for user "a"', hint="retry")
    frames, _ = p.iter_frames(raw)
    fields = p.error_fields(frames[0][1])
    assert fields["C"] == "28P01"
    assert fields["S"] == "ERROR"
    assert fields["H"] == "retry"


def test_client_auth_method_follows_the_route_secret() -> None:
    full = ClientSecret(scram="SCRAM-SHA-256$4096:x$y:z", scrypt="s", md5="md5abc")
    assert choose_method("scram-sha-256", full) == "scram-sha-256"
    assert choose_method("md5", full) == "md5"
    assert choose_method("plain", full) == "password"
    assert choose_method("scram-sha-256", ClientSecret(scrypt="s")) == "password"
    assert choose_method("md5", ClientSecret(scram="SCRAM-SHA-256$1:a$b:c")) == "scram-sha-256"


@given(st.binary(max_size=400))
def test_fuzz_startup_parser(data: bytes) -> None:
    try:
        result = p.parse_startup(data)
    except p.ProtocolViolation:
        return
    assert isinstance(result, p.SSLRequest | p.GSSENCRequest | p.CancelRequest | p.StartupMessage)


@given(
    st.dictionaries(
        st.text(min_size=1).filter(lambda s: "\0" not in s),
        st.text().filter(lambda s: "\0" not in s),
        max_size=5,
    )
)
def test_fuzz_startup_round_trip(params: dict[str, str]) -> None:
    params = {"user": "u", **params}
    packet = p.startup_packet(params)
    length = p.parse_startup_length(packet[:4]) if len(packet) <= p.MAX_STARTUP_LENGTH else None
    if length is None:
        return
    assert p.parse_startup(packet[4:]) == p.StartupMessage(p.PROTOCOL_V3, params)


@given(st.binary(max_size=600))
def test_fuzz_frame_parser(data: bytes) -> None:
    try:
        frames, used = p.iter_frames(data)
    except p.ProtocolViolation:
        return
    assert used <= len(data)
    assert sum(5 + len(body) for _, body in frames) == used


@given(st.text(max_size=200))
def test_fuzz_options_parser(options: str) -> None:
    result = p.search_path_from_options(options)
    assert result is None or isinstance(result, str)
