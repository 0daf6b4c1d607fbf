"""The agent's link to HQ: connect, say Hello, keep the link alive, hand jobs to the executor,
reconnect when it drops, stop when HQ rejects the token.

- Transport: ``hq.transport`` ``websocket``, ``poll``, or ``auto`` (WebSocket first; when the
  upgrade is refused, long-polling, remembered until the agent restarts).
- Liveness: heartbeats every ``heartbeat_interval``; HQ silent for more than two of HQ's
  intervals means a dead link. Reconnects back off exponentially (0.5 s doubling to 30 s, full
  jitter); every successful connect logs ``connected to HQ as NAME``.
- A rejected token (HTTP 401, close code 4401, ``Disconnect``) ends ``run`` with
  ``TokenRejected`` -- unless another token is at hand (a newer ``outpost login``, or
  ``hq.token`` in the config), which is tried first.
- The association and the token are read again at every connect, so ``outpost login`` while
  the agent runs takes effect at the next reconnect, or at once on SIGHUP (``refresh``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from outpost import __version__
from outpost.errors import OutpostError
from outpost.jobs.executor import Executor, discard
from outpost.link.association import Association, load_association, load_token
from outpost.link.backoff import Backoff
from outpost.link.errors import LinkDown, LinkError, TokenRejected, UpgradeRefused
from outpost.link.login import Endpoint, associate, check_url, request_login
from outpost.link.transport import Transport, TransportName
from outpost.link.transport_poll import PollTransport, open_poll
from outpost.link.transport_ws import open_websocket
from outpost.link.verify import JobRefused, check_signature
from outpost.protocol import (
    AgentMessage,
    CancelJob,
    ConnectionMeta,
    ConnectionsReport,
    Disconnect,
    Heartbeat,
    Hello,
    HQMessage,
    ResultAck,
    SignedJob,
    Welcome,
    load_public_key,
)

if TYPE_CHECKING:
    from outpost.api.service import AgentService

log = logging.getLogger("outpost.link")

#: seconds between looks at the connection list (reported to HQ when it changed)
CONNECTIONS_EVERY = 2.0
#: seconds to wait for ``Welcome`` after ``Hello``
WELCOME_TIMEOUT = 15.0


@dataclass(frozen=True)
class Target:
    endpoint: Endpoint
    token: str
    agent_name: str
    hq_id: str
    public_key: Ed25519PublicKey


def link_wanted(service: AgentService) -> bool:
    """Whether ``serve`` should run the link: the agent is associated with an HQ, or the config
    names one (``hq.url``) and a token to log in with (``hq.token`` / ``OUTPOST_HQ_TOKEN``)."""
    cfg = service.config.hq
    if load_association(service.store.data_dir) is not None:
        return True
    return cfg.url is not None and cfg.token is not None


def check_config(service: AgentService) -> None:
    """At start: refuse an HQ address that cannot work (plain HTTP off loopback, missing CA)."""
    cfg = service.config.hq
    association = load_association(service.store.data_dir)
    url = association.url if association is not None else cfg.url
    if url is None:
        return
    insecure = cfg.allow_insecure or (association is not None and association.allow_insecure)
    what = "hq.url" if association is None else f"the HQ address in {service.store.data_dir}"
    endpoint = Endpoint(check_url(url, allow_insecure=insecure, what=what), _ca(cfg, association))
    endpoint.context()


def _ca(cfg: Any, association: Association | None) -> str | None:
    ca: str | None = cfg.ca_file or (association.ca_file if association is not None else None)
    return ca


class HQLink:
    """Runs for the life of ``outpost serve``; ``run`` returns only by raising TokenRejected
    (or being cancelled)."""

    def __init__(self, service: AgentService, executor: Executor) -> None:
        self.service = service
        self.executor = executor
        self.connected = False
        self.transport_name: TransportName | None = None
        self._auto_choice: TransportName | None = None
        self._rejected: set[str] = set()
        self._token: str | None = None
        self._transport: Transport | None = None
        self._wake = asyncio.Event()
        self._refreshing = False
        self._fingerprint: tuple[Any, ...] = ()
        self._warned_url: str | None = None

    # --- what to connect to --------------------------------------------------------------------

    def _on_disk(self) -> tuple[Association | None, str | None, str | None]:
        data_dir = self.service.store.data_dir
        association = load_association(data_dir)
        stored = load_token(data_dir, self.service.key) if association is not None else None
        cfg = self.service.config.hq
        configured = cfg.token.get_secret_value() if cfg.token is not None else None
        return association, stored, configured

    def _candidates(self) -> list[str]:
        _, stored, configured = self._on_disk()
        return [t for t in dict.fromkeys((stored, configured)) if t and t not in self._rejected]

    def _snapshot(self) -> tuple[Any, ...]:
        association, stored, configured = self._on_disk()
        cfg = self.service.config.hq
        return (
            association.model_dump() if association else None,
            stored,
            configured,
            cfg.url,
            cfg.transport,
            cfg.ca_file,
            cfg.allow_insecure,
            self.service.config.read_only,
        )

    async def _resolve(self) -> Target:
        """The association and token to use, logging in first when the token is new to HQ
        (the config's ``hq.token`` at the first start, or a token set in the config later)."""
        cfg = self.service.config.hq
        data_dir = self.service.store.data_dir
        association, stored, _ = self._on_disk()
        self._fingerprint = self._snapshot()
        candidates = self._candidates()
        if not candidates:
            raise LinkError(
                "This agent has no HQ token; run `outpost login --hq URL --token-file FILE` or "
                "set hq.token (OUTPOST_HQ_TOKEN)."
            )
        token = candidates[0]
        self._token = token
        insecure = cfg.allow_insecure or (association is not None and association.allow_insecure)
        if association is None or token != stored:
            url = association.url if association is not None else cfg.url
            if url is None:
                raise LinkError(
                    "hq.url is not set; set it to HQ's address, or run `outpost login`."
                )
            endpoint = Endpoint(
                check_url(url, allow_insecure=insecure), _ca(cfg, association), insecure
            )
            response = await asyncio.to_thread(request_login, endpoint, token)
            association = await asyncio.to_thread(
                associate, data_dir, self.service.key, endpoint, token, response
            )
            self._fingerprint = self._snapshot()
            log.info(
                "logged in to HQ %s at %s as %s; HQ's signing key is pinned",
                association.hq_id,
                association.url,
                association.agent_name,
            )
        if cfg.url and cfg.url.rstrip("/") != association.url and cfg.url != self._warned_url:
            self._warned_url = cfg.url
            log.warning(
                "hq.url %s is not the HQ this agent is associated with (%s); using %s -- to "
                "move to a new address of the same HQ, run `outpost login --hq NEW_URL` again",
                cfg.url,
                association.url,
                association.url,
            )
        endpoint = Endpoint(
            check_url(association.url, allow_insecure=insecure),
            _ca(cfg, association),
            insecure,
        )
        return Target(
            endpoint,
            token,
            association.agent_name,
            association.hq_id,
            load_public_key(association.signing_key),
        )

    # --- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                target = await self._resolve()
                await self._session(target, backoff)
            except TokenRejected as exc:
                if self._token is not None:
                    self._rejected.add(self._token)
                if not self._candidates():
                    raise
                log.warning("%s Trying the other token this agent has.", exc.message)
                continue
            except LinkDown as exc:
                if self._refreshing:
                    self._refreshing = False
                    log.info("reconnecting to HQ to apply the new login or settings")
                    continue
                delay = backoff.next()
                log.warning("link to HQ down: %s; retrying in %.1fs", exc, delay)
                await self._sleep(delay)
            except OutpostError as exc:
                delay = max(backoff.next(), 5.0)
                log.error("cannot connect to HQ: %s (retrying in %.1fs)", exc.message, delay)
                await self._sleep(delay)
            except Exception:
                delay = max(backoff.next(), 5.0)
                log.exception("the link to HQ failed unexpectedly; retrying in %.1fs", delay)
                await self._sleep(delay)

    async def _sleep(self, delay: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def refresh(self) -> None:
        """SIGHUP: reconnect now when the login, the token, the hq settings or read_only
        changed (a new Hello tells HQ)."""
        try:
            changed = await asyncio.to_thread(self._snapshot) != self._fingerprint
        except OutpostError as exc:
            log.error("cannot read the HQ login: %s", exc.message)
            return
        if not changed:
            return
        self._rejected.clear()
        self._wake.set()
        transport = self._transport
        if transport is not None:
            self._refreshing = True
            await transport.close()

    # --- one session ---------------------------------------------------------------------------

    async def _open(self, target: Target, hello: Hello) -> Transport:
        cfg = self.service.config.hq
        wait = min(cfg.heartbeat_interval, 60.0)
        mode = cfg.transport
        if mode == "poll" or (mode == "auto" and self._auto_choice == "poll"):
            return await open_poll(target.endpoint, target.token, hello, wait=wait)
        try:
            return await open_websocket(target.endpoint, target.token, hello)
        except UpgradeRefused as exc:
            if mode == "websocket":
                raise LinkDown(
                    f"{exc} (hq.transport is websocket; set it to auto or poll)"
                ) from None
            log.warning("%s; falling back to long-polling", exc)
        transport = await open_poll(target.endpoint, target.token, hello, wait=wait)
        self._auto_choice = "poll"
        return transport

    async def _welcome(self, transport: Transport, early: list[HQMessage]) -> Welcome:
        deadline = time.monotonic() + WELCOME_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LinkDown("HQ did not answer Hello with Welcome in time")
            try:
                message = await asyncio.wait_for(transport.receive(), remaining)
            except TimeoutError:
                continue
            if isinstance(message, Welcome):
                return message
            if isinstance(message, Disconnect):
                raise TokenRejected(message.code, message.reason)
            early.append(message)

    async def _session(self, target: Target, backoff: Backoff) -> None:
        hello = Hello(
            agent_version=__version__,
            read_only=self.service.config.read_only,
            connections=await asyncio.to_thread(self.service.connection_meta),
            running=await asyncio.to_thread(self.executor.pending),
        )
        transport = await self._open(target, hello)
        self._transport = transport
        tasks: list[asyncio.Task[None]] = []
        try:
            early: list[HQMessage] = []
            welcome = await self._welcome(transport, early)
            backoff.reset()
            interval = welcome.heartbeat_interval
            if isinstance(transport, PollTransport):
                transport.wait = min(interval, 60.0)
            self.connected = True
            self.transport_name = transport.name
            log.info("link to HQ at %s open over %s", target.endpoint.url, transport.name)
            log.info("connected to HQ as %s", welcome.agent_name)
            self.executor.send = self._sender(transport)
            tasks = [
                asyncio.create_task(self._heartbeats(transport, interval), name="hq-heartbeat"),
                asyncio.create_task(
                    self._watch_connections(transport, hello.connections), name="hq-connections"
                ),
            ]
            for message in early:
                await self._dispatch(message, target)
            await self._receive(transport, target, interval)
        finally:
            self.connected = False
            self.executor.send = discard
            self._transport = None
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(Exception):
                await transport.close()

    def _sender(self, transport: Transport) -> Any:
        async def send(message: AgentMessage) -> None:
            try:
                await transport.send(message)
            except (LinkDown, TokenRejected) as exc:
                log.debug("not sent to HQ (%s): %s", exc, message.type)

        return send

    async def _receive(self, transport: Transport, target: Target, interval: float) -> None:
        limit = 2 * interval
        while True:
            remaining = transport.last_seen + limit - time.monotonic()
            if remaining <= 0:
                raise LinkDown(f"no word from HQ for {limit:g}s (two heartbeat intervals)")
            try:
                message = await asyncio.wait_for(transport.receive(), remaining)
            except TimeoutError:
                continue
            await self._dispatch(message, target)

    async def _dispatch(self, message: HQMessage, target: Target) -> None:
        if isinstance(message, SignedJob):
            try:
                body = check_signature(message, target.public_key, target.agent_name)
            except JobRefused as exc:
                await self.executor.refuse(None, exc.reason, job_id=exc.job_id)
                return
            await self.executor.submit(body)
        elif isinstance(message, CancelJob):
            await self.executor.cancel(message.job_id)
        elif isinstance(message, ResultAck):
            await self.executor.ack(message.job_id)
        elif isinstance(message, Disconnect):
            raise TokenRejected(message.code, message.reason, target.endpoint.url)
        # Welcome again, Heartbeat: nothing to do beyond noting HQ is alive

    async def _heartbeats(self, transport: Transport, hq_interval: float) -> None:
        every = min(self.service.config.hq.heartbeat_interval, hq_interval)
        with contextlib.suppress(LinkDown, TokenRejected):
            while True:
                await asyncio.sleep(every)
                await transport.send(Heartbeat(sent_at=time.time()))

    async def _watch_connections(self, transport: Transport, sent: list[ConnectionMeta]) -> None:
        last = sent
        with contextlib.suppress(LinkDown, TokenRejected):
            while True:
                await asyncio.sleep(CONNECTIONS_EVERY)
                try:
                    current = await asyncio.to_thread(self.service.connection_meta)
                except OutpostError as exc:
                    log.warning("cannot read the connection list for HQ: %s", exc.message)
                    continue
                if current != last:
                    await transport.send(ConnectionsReport(connections=current))
                    last = current
