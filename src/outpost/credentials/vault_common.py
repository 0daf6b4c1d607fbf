"""What the ``vault`` and ``vault-db`` credential sources share: the settings (address,
namespace, CA, login method), one logged-in ``hvac`` client per process and configuration,
keeping its token alive, and turning Vault's answers into one-sentence errors.

Settings come from ``credentials.vault`` in the agent's config, falling back to Vault's own
environment variables (``VAULT_ADDR``, ``VAULT_NAMESPACE``, ``VAULT_CACERT``, ``VAULT_TOKEN``)
and ``~/.vault-token``. A plain ``http://`` address is accepted only for a loopback host (a dev
server, or a Vault Agent / Proxy listening on the same machine): anywhere else the token would
cross the network in clear text, so the address must be ``https://``.

The client token's expiry is tracked with the source's clock from the login answer (AppRole,
Kubernetes) or ``auth/token/lookup-self`` (a given token). Within ``credentials.refresh_margin``
seconds of expiry (at most half its lifetime) the token is renewed with
``auth/token/renew-self`` when it is renewable; a login method that cannot renew (or whose
renewal hits the token's max TTL) logs in again. A token that Vault stops accepting early
(revoked) makes a login method log in again once before giving up.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from outpost.credentials.base import (
    Clock,
    CredentialContext,
    CredentialError,
    CredentialSource,
)

log = logging.getLogger("outpost.credentials")

#: Host names that always mean this machine (plain http is allowed to them).
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

#: Longest piece of a Vault error message quoted in our own message.
MAX_QUOTED = 200


def _import_hvac(source: CredentialSource) -> Any:
    try:
        import hvac
    except ImportError:
        raise source.missing_extra("hvac") from None
    return hvac


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class VaultSettings:
    """Where Vault is and how to log in; ``secret`` (a token or a secret_id) never shows."""

    address: str
    namespace: str | None
    verify: bool | str
    timeout: float
    method: str  # token | approle | kubernetes
    mount: str  # the auth mount (approle, kubernetes); "token" for a given token
    role_id: str | None = None
    role: str | None = None
    jwt_path: str | None = None
    origin: str = ""  # where the token or secret_id came from, for messages
    secret: str = field(default="", repr=False)

    def key(self) -> tuple[Any, ...]:
        digest = hashlib.sha256(self.secret.encode()).hexdigest()
        return (
            self.address,
            self.namespace,
            self.verify,
            self.timeout,
            self.method,
            self.mount,
            self.role_id,
            self.role,
            self.jwt_path,
            digest,
        )


def resolve_settings(source: CredentialSource, ctx: CredentialContext | None) -> VaultSettings:
    """The effective settings: config first, then Vault's environment variables."""
    vault = source.config.vault
    address = (vault.address or os.environ.get("VAULT_ADDR") or "").strip().rstrip("/")
    if not address:
        raise source.error(
            ctx,
            "no Vault address is set; set credentials.vault.address in the config or VAULT_ADDR",
        )
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise source.error(ctx, f"the Vault address {address!r} is not an http:// or https:// URL")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise source.error(
            ctx,
            f"refusing to send a Vault token over plain http to {parts.hostname}; use an "
            "https:// address (plain http is allowed only to 127.0.0.1, ::1 and localhost)",
        )
    namespace = vault.namespace or os.environ.get("VAULT_NAMESPACE") or None
    ca_file = vault.ca_file or os.environ.get("VAULT_CACERT") or None
    verify: bool | str = True
    if ca_file:
        if not Path(ca_file).expanduser().is_file():
            raise source.error(
                ctx, f"the Vault CA file {ca_file} (credentials.vault.ca_file) does not exist"
            )
        verify = str(Path(ca_file).expanduser())
    auth = vault.auth
    common: dict[str, Any] = {
        "address": address,
        "namespace": namespace,
        "verify": verify,
        "timeout": vault.timeout,
        "method": auth.method,
    }
    if auth.method == "approle":
        secret_id = auth.secret_id.get_secret_value() if auth.secret_id else ""
        if not auth.role_id or not secret_id:
            raise source.error(
                ctx,
                "AppRole login needs credentials.vault.auth.role_id and "
                "credentials.vault.auth.secret_id",
            )
        return VaultSettings(
            **common,
            mount=(auth.mount or "approle").strip("/"),
            role_id=auth.role_id,
            origin="credentials.vault.auth.secret_id",
            secret=secret_id,
        )
    if auth.method == "kubernetes":
        if not auth.role:
            raise source.error(ctx, "Kubernetes login needs credentials.vault.auth.role")
        return VaultSettings(
            **common,
            mount=(auth.mount or "kubernetes").strip("/"),
            role=auth.role,
            jwt_path=auth.jwt_path,
            origin=auth.jwt_path,
        )
    token, origin = _given_token(auth.token.get_secret_value() if auth.token else None)
    if not token:
        raise source.error(
            ctx,
            "no Vault token is given; set credentials.vault.auth.token, VAULT_TOKEN or "
            "~/.vault-token, or log in with auth.method approle or kubernetes",
        )
    return VaultSettings(**common, mount="token", origin=origin, secret=token)


def _given_token(configured: str | None) -> tuple[str, str]:
    if configured:
        return configured.strip(), "credentials.vault.auth.token"
    env = os.environ.get("VAULT_TOKEN", "").strip()
    if env:
        return env, "VAULT_TOKEN"
    path = Path.home() / ".vault-token"
    try:
        return path.read_text().strip(), "~/.vault-token"
    except (OSError, UnicodeDecodeError):
        return "", ""


def _quote(errors: Any, secrets: tuple[str, ...]) -> str:
    """Vault's own error text, shortened and with anything secret cut out."""
    if isinstance(errors, list | tuple):
        text = "; ".join(str(e) for e in errors if e)
    else:
        text = str(errors or "")
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split()).rstrip(".")
    if len(text) > MAX_QUOTED:
        text = text[: MAX_QUOTED - 3] + "..."
    return text


class VaultSession:
    """One hvac client and its token, shared by every source with the same settings and clock.

    The lock guards logging in and renewing; requests themselves run in parallel (a token
    replaced mid-flight is a plain attribute swap on the client).
    """

    def __init__(self, settings: VaultSettings, clock: Clock, refresh_margin: float) -> None:
        self.settings = settings
        self.clock = clock
        self.refresh_margin = refresh_margin
        self._lock = threading.Lock()
        self._client: Any = None
        self._logged_in = False
        self._expires_at: float | None = None
        self._lifetime = 0.0
        self._renewable = False
        self._jwt = ""
        self.policies: tuple[str, ...] = ()
        #: KV mount detection results: path -> (mount, version)
        self.kv_mounts: dict[str, tuple[str, int]] = {}
        #: counters, for status and tests
        self.logins = 0
        self.renewals = 0

    # --- the client and its token --------------------------------------------------------

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.settings.secret, self._jwt, str(getattr(self._client, "token", "") or ""))

    def client(self, source: CredentialSource, ctx: CredentialContext | None) -> Any:
        """The hvac client with a token good for a while (logging in or renewing first)."""
        with self._lock:
            if self._client is None:
                hvac = _import_hvac(source)
                s = self.settings
                self._client = hvac.Client(
                    url=s.address,
                    # "" rather than None: hvac would read VAULT_TOKEN / ~/.vault-token itself
                    token=s.secret if s.method == "token" else "",
                    namespace=s.namespace,
                    verify=s.verify,
                    timeout=s.timeout,
                )
            self._ensure_token(source, ctx)
            return self._client

    def forget_token(self) -> None:
        """Log in again (or look the token up again) before the next request."""
        with self._lock:
            self._logged_in = False

    def _ensure_token(self, source: CredentialSource, ctx: CredentialContext | None) -> None:
        if not self._logged_in:
            self._login(source, ctx)
            return
        if self._expires_at is None:
            return
        now = self.clock()
        margin = min(self.refresh_margin, self._lifetime / 2)
        if now < self._expires_at - margin:
            return
        renewed = self._renewable and now < self._expires_at and self._renew_self(source, ctx)
        if renewed and (
            self.settings.method == "token"
            or self._expires_at is None
            or self._expires_at - now > margin
        ):
            return
        if self.settings.method != "token":
            self._login(source, ctx)
        elif now >= self._expires_at:
            # Vault says whether the token really is gone (our clock may run ahead of it)
            self._login(source, ctx, expired=True)

    def _track(self, ttl: Any, renewable: Any) -> None:
        seconds = float(ttl or 0)
        self._lifetime = seconds
        self._expires_at = self.clock() + seconds if seconds > 0 else None
        self._renewable = bool(renewable)

    def _login(
        self, source: CredentialSource, ctx: CredentialContext | None, *, expired: bool = False
    ) -> None:
        hvac = _import_hvac(source)
        s = self.settings
        client = self._client
        try:
            if s.method == "token":
                client.token = s.secret
                data = client.auth.token.lookup_self()["data"]
                self._track(data.get("ttl"), data.get("renewable"))
                self.policies = tuple(data.get("policies") or ())
                what = f"the token from {s.origin}"
            else:
                if s.method == "approle":
                    answer = client.auth.approle.login(
                        role_id=s.role_id, secret_id=s.secret, mount_point=s.mount
                    )
                    what = f"AppRole login at auth/{s.mount}/login"
                else:
                    self._jwt = self._read_jwt(source, ctx)
                    answer = client.auth.kubernetes.login(
                        role=s.role, jwt=self._jwt, mount_point=s.mount
                    )
                    what = f"Kubernetes login as role {s.role} at auth/{s.mount}/login"
                auth = answer["auth"]
                client.token = auth["client_token"]
                self._track(auth.get("lease_duration"), auth.get("renewable"))
                self.policies = tuple(auth.get("policies") or ())
        except hvac.exceptions.VaultError as exc:
            self._logged_in = False
            raise self._login_error(source, ctx, exc, expired=expired) from None
        except Exception as exc:  # network, TLS
            self._logged_in = False
            raise self.translate(source, ctx, exc, path=f"auth/{s.mount}") from None
        self._logged_in = True
        self.logins += 1
        log.info(
            "vault: %s accepted at %s (token TTL %s, renewable: %s, policies: %s)",
            what,
            s.address,
            f"{self._lifetime:.0f} s" if self._expires_at is not None else "none",
            "yes" if self._renewable else "no",
            ", ".join(self.policies) or "none",
        )

    def _login_error(
        self,
        source: CredentialSource,
        ctx: CredentialContext | None,
        exc: Exception,
        *,
        expired: bool,
    ) -> CredentialError:
        hvac = _import_hvac(source)
        s = self.settings
        if isinstance(exc, hvac.exceptions.VaultDown | hvac.exceptions.VaultNotInitialized):
            return self.translate(source, ctx, exc, path=f"auth/{s.mount}")
        reason = _quote(getattr(exc, "errors", None), self.secrets) or type(exc).__name__
        if s.method == "token":
            if expired:
                return source.error(
                    ctx,
                    f"the Vault token from {s.origin} has expired; give a new one (AppRole and "
                    "Kubernetes login get new tokens by themselves)",
                )
            return source.error(
                ctx,
                f"Vault refused the token from {s.origin} ({reason}): it is wrong, expired or "
                "revoked, or lacks the default policy that allows auth/token/lookup-self",
            )
        if s.method == "approle":
            return source.error(
                ctx,
                f"AppRole login at auth/{s.mount}/login failed ({reason}); check "
                "credentials.vault.auth.role_id and secret_id",
            )
        return source.error(
            ctx,
            f"Kubernetes login as role {s.role} at auth/{s.mount}/login failed ({reason}); "
            "check the role's bound service accounts and the token in "
            f"{s.jwt_path}",
        )

    def _read_jwt(self, source: CredentialSource, ctx: CredentialContext | None) -> str:
        path = Path(self.settings.jwt_path or "").expanduser()
        try:
            jwt = path.read_text().strip()
        except FileNotFoundError:
            raise source.error(
                ctx, f"the Kubernetes service-account token {path} does not exist"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not text"
            raise source.error(
                ctx, f"cannot read the Kubernetes service-account token {path}: {reason}"
            ) from None
        if not jwt:
            raise source.error(ctx, f"the Kubernetes service-account token {path} is empty")
        return jwt

    def _renew_self(self, source: CredentialSource, ctx: CredentialContext | None) -> bool:
        """Extend the client token; False when Vault refuses (the caller logs in again)."""
        hvac = _import_hvac(source)
        try:
            answer = self._client.auth.token.renew_self()
        except hvac.exceptions.VaultError as exc:
            reason = _quote(getattr(exc, "errors", None), self.secrets) or type(exc).__name__
            then = "logging in again" if self.settings.method != "token" else "using it as is"
            log.warning("vault: renewing the client token failed (%s); %s", reason, then)
            return False
        except Exception as exc:
            raise self.translate(source, ctx, exc, path="auth/token/renew-self") from None
        auth = answer["auth"]
        self._track(auth.get("lease_duration"), auth.get("renewable"))
        self.renewals += 1
        log.info("vault: renewed the client token (TTL now %.0f s)", self._lifetime)
        return True

    # --- requests ------------------------------------------------------------------------

    def request(
        self,
        source: CredentialSource,
        ctx: CredentialContext | None,
        method: str,
        path: str,
        *,
        capability: str,
        body: dict[str, Any] | None = None,
        not_found: str | None = None,
        denied: Callable[[], str] | None = None,
        rejected_ok: bool = False,
    ) -> Any:
        """One Vault API call (``path`` without ``/v1/``), errors as one sentence.

        A 403 on a token that Vault no longer accepts logs in again (once) for AppRole and
        Kubernetes; otherwise it is a permission error naming ``capability`` on ``path``.
        With ``rejected_ok`` a 400 or 404 answer returns None instead of raising.
        """
        hvac = _import_hvac(source)
        for attempt in (1, 2):
            client = self.client(source, ctx)
            try:
                call = getattr(client.adapter, method.lower())
                if body is None:
                    return call(f"/v1/{path}")
                return call(f"/v1/{path}", json=body)
            except hvac.exceptions.Forbidden:
                if not self._token_alive(source, ctx):
                    if self.settings.method != "token" and attempt == 1:
                        self.forget_token()
                        continue
                    raise self._login_error(
                        source, ctx, hvac.exceptions.Forbidden(), expired=self._past_expiry()
                    ) from None
                if denied is not None:
                    raise source.error(ctx, denied()) from None
                raise source.error(ctx, self.denied(path, capability)) from None
            except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest) as exc:
                if rejected_ok:
                    return None
                if isinstance(exc, hvac.exceptions.InvalidRequest):
                    raise self.translate(source, ctx, exc, path=path) from None
                if not_found is not None:
                    raise source.error(ctx, not_found) from None
                raise self.translate(source, ctx, exc, path=path) from None
            except Exception as exc:
                raise self.translate(source, ctx, exc, path=path) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _past_expiry(self) -> bool:
        return self._expires_at is not None and self.clock() >= self._expires_at

    def _token_alive(self, source: CredentialSource, ctx: CredentialContext | None) -> bool:
        """Whether Vault still accepts the client token (a 403 may mean it is gone)."""
        try:
            self._client.auth.token.lookup_self()
        except Exception:
            return False
        return True

    def denied(self, path: str, capability: str) -> str:
        policies = ", ".join(self.policies) or "none"
        return (
            f"permission denied: the token's policies ({policies}) do not grant "
            f'{capability} on {path}; add a policy with path "{path}" '
            f'{{ capabilities = ["{capability}"] }}'
        )

    def translate(
        self,
        source: CredentialSource,
        ctx: CredentialContext | None,
        exc: BaseException,
        *,
        path: str,
    ) -> CredentialError:
        """Network, TLS and Vault status errors as one sentence (never a secret)."""
        hvac = _import_hvac(source)
        import requests

        address = self.settings.address
        if isinstance(exc, CredentialError):
            return exc
        if isinstance(exc, requests.exceptions.SSLError):
            return source.error(
                ctx,
                f"the TLS certificate of Vault at {address} could not be verified; set "
                "credentials.vault.ca_file to the CA that signed it",
            )
        if isinstance(exc, requests.exceptions.Timeout):
            return source.error(
                ctx,
                f"Vault at {address} did not answer within {self.settings.timeout:g} s "
                "(credentials.vault.timeout)",
            )
        if isinstance(exc, requests.exceptions.ConnectionError):
            return source.error(
                ctx,
                f"cannot reach Vault at {address}; check that it is running and that "
                "credentials.vault.address (or VAULT_ADDR) is right",
            )
        if isinstance(exc, requests.exceptions.RequestException):
            return source.error(ctx, f"the request to Vault at {address} failed")
        if not isinstance(exc, hvac.exceptions.VaultError):
            return source.error(ctx, f"unexpected answer from Vault at {address} for {path}")
        reason = _quote(getattr(exc, "errors", None), self.secrets)
        if isinstance(exc, hvac.exceptions.VaultDown):
            if "sealed" in reason.lower():
                return source.error(ctx, f"Vault at {address} is sealed; unseal it first")
            return source.error(
                ctx, f"Vault at {address} is unavailable (503: standby or maintenance)"
            )
        if isinstance(exc, hvac.exceptions.VaultNotInitialized):
            return source.error(ctx, f"Vault at {address} is not initialised")
        if isinstance(exc, hvac.exceptions.Forbidden):
            return source.error(ctx, f"permission denied on {path}")
        if isinstance(exc, hvac.exceptions.InvalidPath):
            return source.error(ctx, f"Vault has nothing at {path}")
        if isinstance(exc, hvac.exceptions.RateLimitExceeded):
            return source.error(ctx, f"Vault at {address} is rate-limiting requests (429)")
        if isinstance(exc, hvac.exceptions.InvalidRequest):
            return source.error(ctx, f"Vault rejected the request for {path}: {reason}")
        status = type(exc).__name__
        return source.error(
            ctx, f"Vault failed on {path} ({status}{': ' + reason if reason else ''})"
        )


_sessions: dict[tuple[Any, ...], VaultSession] = {}
_sessions_lock = threading.Lock()


def session_for(source: CredentialSource, ctx: CredentialContext | None) -> VaultSession:
    """The shared session for the source's settings and clock (created on first use)."""
    _import_hvac(source)  # say which extra is missing before anything else
    settings = resolve_settings(source, ctx)
    # the session keeps the clock alive, so its id stays unique while the key is in use
    key = (*settings.key(), source.config.refresh_margin, id(source.clock))
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = VaultSession(settings, source.clock, source.config.refresh_margin)
            _sessions[key] = session
        return session


def reset_sessions() -> None:
    """Forget every shared client (tests; a reloaded config)."""
    with _sessions_lock:
        _sessions.clear()
