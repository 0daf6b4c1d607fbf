"""Configuration: discovery, models, validation, env overrides, redaction.

One place for every setting. The file is JSON, found as users of self-hosted agents expect:
``-c/--config PATH`` or ``OUTPOST_CONFIG``; else, as root, ``/etc/outpost/agent.json``;
otherwise ``$XDG_CONFIG_HOME/outpost/agent.json``, ``$HOME/.config/outpost/agent.json``,
``/etc/outpost/agent.json``; else built-in defaults.

Every problem is reported at once, each naming the file (or environment variable), the key
and the reason. Unknown keys are errors. Secrets may be written as ``{"$env": "NAME"}`` or
``{"$file": "/path"}``; ``redacted()`` hides them for ``outpost config show``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from outpost.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/outpost/agent.json")
ENV_PREFIX = "OUTPOST_"
REDACTED = "********"


def _check_host_port(value: str) -> str:
    """Accept ``host:port`` and ``[v6]:port`` with a port in 1..65535."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+):(\d+)", value)
    if not match:
        raise ValueError(f"{value!r} is not HOST:PORT (for example 127.0.0.1:9701)")
    host, port = match.group(1), int(match.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} in {value!r} is not between 1 and 65535")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host} in {value!r} is not an IPv6 address") from None
    return value


HostPort = Annotated[str, AfterValidator(_check_host_port)]


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)


class LogConfig(Section):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class ApiConfig(Section):
    client_bind_addresses: list[HostPort] = Field(default_factory=lambda: ["127.0.0.1:9701"])


class ChecksConfig(Section):
    """The periodic connection check that keeps UP current."""

    interval: float = Field(60.0, gt=0, description="seconds between checks of every connection")
    timeout: float = Field(10.0, gt=0, description="seconds one check may take")


class QueryConfig(Section):
    """Limits for queries run through the agent."""

    max_rows: int = Field(1000, ge=1)
    timeout: float = Field(30.0, gt=0, description="statement timeout in seconds")
    workers: int = Field(8, ge=1, le=256, description="threads running blocking driver calls")


class ClusterConfig(Section):
    """Raft cluster settings (used by the cluster issue; validated now)."""

    member_name: str | None = None
    client_bind_addresses: list[HostPort] = Field(default_factory=lambda: ["0.0.0.0:9701"])
    client_advertise_addresses: list[HostPort] = Field(default_factory=list)
    peer_bind_addresses: list[HostPort] = Field(default_factory=lambda: ["0.0.0.0:9702"])
    peer_advertise_addresses: list[HostPort] = Field(default_factory=list)
    join_urls: list[str] = Field(default_factory=list)
    election_timeout: int = Field(1000, gt=0, description="milliseconds")
    heartbeat_interval: int = Field(100, gt=0, description="milliseconds")

    @model_validator(mode="after")
    def _heartbeat_below_election(self) -> ClusterConfig:
        if self.heartbeat_interval >= self.election_timeout:
            raise ValueError(
                "heartbeat_interval must be smaller than election_timeout "
                f"({self.heartbeat_interval} >= {self.election_timeout})"
            )
        return self

    @field_validator("join_urls")
    @classmethod
    def _join_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.fullmatch(r"agent://[^/\s]+:\d+", url):
                raise ValueError(f"{url!r} is not agent://HOST:PORT")
        return urls


class HQConfig(Section):
    """The link to Outpost HQ (used by the HQ issue; validated now)."""

    url: str | None = None
    token: SecretStr | None = None
    transport: Literal["auto", "websocket", "poll"] = "auto"
    ca_file: str | None = None
    allow_insecure: bool = False
    heartbeat_interval: float = Field(5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://", value):
            raise ValueError(f"{value!r} must start with https:// (or http:// on loopback)")
        return value


class StorageConfig(Section):
    """Snapshot storage targets (used by the snapshots issue; validated now)."""

    backend: str | None = None
    backends: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _backend_is_configured(self) -> StorageConfig:
        if self.backend is not None and self.backend not in self.backends:
            raise ValueError(
                f"backend {self.backend!r} has no entry under storage.backends "
                f"(configured: {', '.join(sorted(self.backends)) or 'none'})"
            )
        return self


class PoolerConfig(Section):
    """The PostgreSQL pooler: `outpost pooler serve`, or inside `outpost serve` when present."""

    listen_addresses: list[HostPort] = Field(default_factory=lambda: ["127.0.0.1:6432"])
    pool_mode: Literal["transaction", "session"] = "transaction"
    pool_size: int = Field(20, ge=1, alias="max_open_conns")
    min_idle: int = Field(0, ge=0)
    max_idle: int = Field(20, ge=0, alias="max_idle_conns")
    max_lifetime: float = Field(3600.0, ge=0, alias="conn_max_lifetime")
    max_idle_time: float = Field(600.0, ge=0, alias="conn_max_idle_time")
    connect_timeout: float = Field(10.0, gt=0)
    close_timeout: float = Field(5.0, gt=0)
    schema_set_timeout: float = Field(5.0, gt=0)
    max_client_conn: int = Field(1000, ge=1, alias="max_client_conns")
    client_wait_timeout: float = Field(30.0, gt=0)
    auth_db_dsn: SecretStr | None = None
    auth_query_timeout: float = Field(5.0, gt=0)
    auth_cache_seconds: float = Field(
        5.0, ge=0, description="how long a perseus_auth row is reused before it is read again"
    )
    dest_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = (
        Field("prefer", description="TLS to destinations of perseus_auth routes")
    )
    dest_sslrootcert: str | None = None
    aws_kms_key_arn: str | None = None
    admin_users: list[str] = Field(default_factory=list)
    client_auth: Literal["scram-sha-256", "md5", "plain"] = "scram-sha-256"
    allow_cleartext_without_tls: bool = False
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    client_tls_sslmode: (
        Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None
    ) = Field(
        None,
        description="TLS from clients (pgbouncer's values); default prefer with tls_cert_file, "
        "else disable",
    )
    workers: int = Field(1, ge=1, le=64)
    metrics_listen: HostPort | None = Field(
        None,
        description="HOST:PORT for /metrics, /healthz and /readyz of `outpost pooler serve` "
        "(inside `outpost serve`, the agent's API has them)",
    )

    @property
    def client_sslmode(self) -> str:
        """client_tls_sslmode, or its default: prefer when a certificate is set, else disable."""
        if self.client_tls_sslmode is not None:
            return self.client_tls_sslmode
        return "prefer" if self.tls_cert_file else "disable"

    @model_validator(mode="after")
    def _tls_files_for_the_mode(self) -> PoolerConfig:
        mode = self.client_sslmode
        if mode != "disable" and not self.tls_cert_file:
            raise ValueError(
                f"client_tls_sslmode {mode} needs tls_cert_file (and tls_key_file unless the "
                "key is in that file)"
            )
        if mode in ("verify-ca", "verify-full") and not self.tls_ca_file:
            raise ValueError(
                f"client_tls_sslmode {mode} needs tls_ca_file (the CA that signs client "
                "certificates)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _name_or_alias(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                if info.alias and name in data and info.alias in data:
                    raise ValueError(
                        f"give either {name} or its Perseus name {info.alias}, not both"
                    )
        return data


class AWSCredentialsConfig(Section):
    """Defaults for the aws-secretsmanager and aws-rds-iam sources (boto3's chain otherwise)."""

    region: str | None = None
    endpoint_url: str | None = Field(
        None, description="Secrets Manager endpoint (a VPC endpoint or an emulator)"
    )
    profile: str | None = None


class GCPCredentialsConfig(Section):
    """Defaults for the gcp-secretmanager and gcp-cloudsql-iam sources."""

    secretmanager_url: str = "https://secretmanager.googleapis.com"
    credentials_file: str | None = Field(
        None, description="a service-account JSON key; default: Application Default Credentials"
    )


class VaultAuthConfig(Section):
    method: Literal["token", "approle", "kubernetes"] = "token"
    token: SecretStr | None = Field(None, description="for method token; default $VAULT_TOKEN")
    role_id: str | None = None
    secret_id: SecretStr | None = None
    role: str | None = Field(None, description="Kubernetes auth role")
    jwt_path: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    mount: str | None = Field(None, description="auth mount (default: approle / kubernetes)")


class VaultCredentialsConfig(Section):
    address: str | None = Field(None, description="default: $VAULT_ADDR")
    namespace: str | None = None
    ca_file: str | None = None
    timeout: float = Field(10.0, gt=0)
    auth: VaultAuthConfig = Field(default_factory=VaultAuthConfig)


class CredentialsConfig(Section):
    """Where connection passwords given as `--password-from SOURCE` are fetched from."""

    cache_ttl: float = Field(
        300.0, ge=0, description="seconds a fetched secret without its own expiry is cached"
    )
    refresh_margin: float = Field(
        60.0, ge=0, description="refresh an expiring token or lease this many seconds early"
    )
    aws: AWSCredentialsConfig = Field(default_factory=AWSCredentialsConfig)
    gcp: GCPCredentialsConfig = Field(default_factory=GCPCredentialsConfig)
    vault: VaultCredentialsConfig = Field(default_factory=VaultCredentialsConfig)


def _default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/outpost"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "outpost")


class AgentConfig(Section):
    """The whole agent configuration."""

    data_dir: Path = Field(default_factory=lambda: Path(_default_data_dir()))
    key_path: Path | None = None
    read_only: bool = False
    log: LogConfig = Field(default_factory=LogConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    query: QueryConfig = Field(default_factory=QueryConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    hq: HQConfig = Field(default_factory=HQConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    credentials: CredentialsConfig = Field(default_factory=CredentialsConfig)
    pooler: PoolerConfig | None = None


SECTIONS: dict[str, type[Section]] = {
    name: info.annotation
    for name, info in AgentConfig.model_fields.items()
    if isinstance(info.annotation, type) and issubclass(info.annotation, Section)
}
SECTIONS["pooler"] = PoolerConfig

#: Fields that hold secrets wherever they are, by (section, key).
SECRET_FIELDS = {("hq", "token"), ("pooler", "auth_db_dsn")}
_SECRET_LEAVES = {"token", "secret_id", "auth_db_dsn", "password"}
_SECRET_KEY_WORDS = ("password", "secret", "token", "account_key", "credentials")


@dataclass
class LoadedConfig:
    """The effective configuration and where each part came from."""

    config: AgentConfig
    source: Path | None
    secret_paths: set[tuple[str, ...]] = field(default_factory=set)
    env_keys: dict[tuple[str, ...], str] = field(default_factory=dict)

    def redacted(self) -> dict[str, Any]:
        """The effective config as JSON-able data with every secret replaced."""
        data = self.config.model_dump(mode="json", by_alias=False)
        secrets = set(self.secret_paths) | SECRET_FIELDS

        def walk(node: Any, path: tuple[str, ...]) -> Any:
            if isinstance(node, dict):
                return {k: walk(v, (*path, k)) for k, v in node.items()}
            if node is None:
                return None
            if (
                path in secrets
                or path[-1] in _SECRET_LEAVES
                or (
                    len(path) > 2
                    and any(w in path[-1].lower() for w in _SECRET_KEY_WORDS)
                    and not path[-1].endswith(("_url", "_file", "_path"))
                )
            ):
                return REDACTED
            return node

        return walk(data, ())  # type: ignore[no-any-return]


def discover_config_path(
    explicit: str | None = None, env: Mapping[str, str] | None = None
) -> tuple[Path | None, bool]:
    """Return (path, explicit). An explicit path must exist; the others are tried in order."""
    env = os.environ if env is None else env
    chosen = explicit or env.get("OUTPOST_CONFIG")
    if chosen:
        return Path(chosen).expanduser(), True
    candidates: list[Path] = []
    if os.geteuid() == 0:
        candidates.append(SYSTEM_CONFIG)
    else:
        if env.get("XDG_CONFIG_HOME"):
            candidates.append(Path(env["XDG_CONFIG_HOME"]) / "outpost" / "agent.json")
        if env.get("HOME"):
            candidates.append(Path(env["HOME"]) / ".config" / "outpost" / "agent.json")
        candidates.append(SYSTEM_CONFIG)
    for candidate in candidates:
        if candidate.is_file():
            return candidate, False
    return None, False


def _resolve_secret_refs(
    node: Any, path: tuple[str, ...], where: str, problems: list[str], secrets: set[tuple[str, ...]]
) -> Any:
    if isinstance(node, dict):
        if len(node) == 1 and next(iter(node)) in ("$env", "$file"):
            kind, ref = next(iter(node.items()))
            key = ".".join(path)
            secrets.add(path)
            if not isinstance(ref, str) or not ref:
                problems.append(f"{where}: key '{key}': {kind} needs a non-empty string")
                return None
            if kind == "$env":
                if ref not in os.environ:
                    problems.append(f"{where}: key '{key}': environment variable {ref} is not set")
                    return None
                return os.environ[ref]
            try:
                return Path(ref).expanduser().read_text().rstrip("\n")
            except OSError as exc:
                problems.append(f"{where}: key '{key}': cannot read {ref}: {exc.strerror}")
                return None
        return {
            k: _resolve_secret_refs(v, (*path, k), where, problems, secrets)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_resolve_secret_refs(v, path, where, problems, secrets) for v in node]
    return node


def _env_value(field_annotation: Any, raw: str) -> Any:
    text = raw.strip()
    origin = getattr(field_annotation, "__origin__", None)
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    if origin is list or field_annotation is list:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _env_overrides(
    env: Mapping[str, str], data: dict[str, Any], env_keys: dict[tuple[str, ...], str]
) -> None:
    """Apply OUTPOST_<KEY> and OUTPOST_<SECTION>_<KEY> to the raw data, in place."""
    targets: dict[str, tuple[tuple[str, ...], Any]] = {}
    for name, info in AgentConfig.model_fields.items():
        if name in SECTIONS:
            for sub, subinfo in SECTIONS[name].model_fields.items():
                targets[f"{ENV_PREFIX}{name}_{sub}".upper()] = ((name, sub), subinfo.annotation)
        else:
            targets[f"{ENV_PREFIX}{name}".upper()] = ((name,), info.annotation)
    for var, (path, annotation) in targets.items():
        if var not in env:
            continue
        value = _env_value(annotation, env[var])
        node = data
        for part in path[:-1]:
            existing = node.get(part)
            if not isinstance(existing, dict):
                existing = {}
                node[part] = existing
            node = existing
        node[path[-1]] = value
        env_keys[path] = var


def _format_loc(loc: tuple[int | str, ...]) -> tuple[str, ...]:
    return tuple(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def _relative_to(base: Path | None, value: Path | None) -> Path | None:
    if value is None:
        return None
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        return (base.parent / value).resolve()
    return value


def load_config(explicit: str | None = None, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Find, read and validate the configuration, reporting every problem at once."""
    env = os.environ if env is None else env
    path, was_explicit = discover_config_path(explicit, env)
    problems: list[str] = []
    secrets: set[tuple[str, ...]] = set()
    env_keys: dict[tuple[str, ...], str] = {}
    raw: Any = {}
    where = str(path) if path else "built-in defaults"
    if path is not None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            how = "given with -c/--config" if explicit else "named by OUTPOST_CONFIG"
            raise ConfigError(
                [f"Config file {path} ({how}) does not exist; create it or fix the path."]
            ) from None
        except OSError as exc:
            raise ConfigError([f"Cannot read config file {path}: {exc.strerror}."]) from None
        try:
            raw = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(
                [f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}."]
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"{path}: the top level must be a JSON object {{...}}."])
    del was_explicit
    raw = _resolve_secret_refs(raw, (), where, problems, secrets)
    _env_overrides(env, raw, env_keys)
    config: AgentConfig | None = None
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _format_loc(err["loc"])
            key = ".".join(loc) or "(top level)"
            source = env_keys.get(loc, where)
            if err["type"] == "extra_forbidden":
                parent = loc[:-1]
                model: type[BaseModel] = AgentConfig
                if parent and parent[0] in SECTIONS:
                    model = SECTIONS[parent[0]]
                known = ", ".join(sorted(model.model_fields))
                problems.append(f"{source}: key '{key}': unknown key (known here: {known})")
            else:
                msg = err["msg"]
                if msg.startswith("Value error, "):
                    msg = msg[len("Value error, ") :]
                problems.append(f"{source}: key '{key}': {msg}")
    if problems:
        raise ConfigError(problems)
    assert config is not None
    config.data_dir = _relative_to(path, config.data_dir) or config.data_dir
    config.key_path = _relative_to(path, config.key_path)
    return LoadedConfig(config=config, source=path, secret_paths=secrets, env_keys=env_keys)
