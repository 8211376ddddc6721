"""Webhooks: ``documents.indexed`` in, signed HTTP callbacks out.

The runner hands over micro-batches of completion events (group
``<prefix>webhooks``). Each event becomes one delivery per endpoint that wants it
(:func:`~colstream.consumers.webhooks.core.plan_deliveries`). Deliveries run as
tasks on one asyncio loop in a thread of their own, at most
``concurrency_per_endpoint`` requests at a time to one endpoint, so a slow or dead
endpoint only ever holds its own requests. A batch's future completes when each of
its deliveries got a 2xx or was dead-lettered; only then are the dead letters produced
and the batch committed. A slow endpoint therefore holds back commits, and, once
``max_in_flight`` batches wait on it, the next batches; memory stays bounded by
``max_in_flight * batch_size`` events.

Each request goes to an address the egress policy checked (the name is resolved
here, every address checked, the connection made to the checked one with the name
kept for ``Host`` and TLS), redirects are never followed, proxies from the
environment are not used, and the response body is never read.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
from tenacity import AsyncRetrying

from colstream.consumers.webhooks.core import (
    STAGE,
    AttemptResult,
    Delivery,
    DeliveryOutcome,
    EgressPolicy,
    Target,
    WebhookNotAllowed,
    parse_retry_after,
    plan_deliveries,
    retry_policy,
    signed_headers,
)
from colstream.infra.kafka import OutRecord
from colstream.infra.settings import ColstreamSettings
from colstream.infra.stage_failures import StageFailures, dead_letter
from colstream.infra.stage_runner import Emit, RawRecord, StageRunner
from colstream.schemas.codec import InvalidRecord, decode_indexed

log = logging.getLogger(__name__)


# host, port -> the addresses it resolves to
Resolver = Callable[[str, int], Awaitable[list[str]]]


class Sender(Protocol):
    """One POST to ``address`` (a checked IP) for ``target``; returns the status and headers."""

    async def __call__(self, target: Target, address: str, headers: dict[str, str], body: bytes,
                       timeout_s: float) -> tuple[int, dict[str, str]]: ...


async def dns_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class HttpxSender:
    """The real sender: httpx, no redirects, no proxies from the environment. ``verify``: the
    system CAs by default, or an ``ssl.SSLContext`` holding a private CA."""

    def __init__(self, verify: ssl.SSLContext | bool = True) -> None:
        self._verify = verify
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, target: Target, address: str, headers: dict[str, str], body: bytes,
                       timeout_s: float) -> tuple[int, dict[str, str]]:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False, verify=self._verify,
                                             limits=httpx.Limits(max_keepalive_connections=20))
        request = self._client.build_request(
            "POST", target.url_for(address), content=body, headers={**headers, "host": target.host_header},
            timeout=timeout_s,
            # TLS: SNI and certificate checks are for the name, the socket goes to the address.
            extensions={"sni_hostname": target.host} if target.scheme == "https" else {},
        )
        response = await self._client.send(request, stream=True)
        try:
            return response.status_code, {k.lower(): v for k, v in response.headers.items()}
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class WebhooksHandler:
    name = STAGE

    def __init__(
        self,
        settings: ColstreamSettings,
        *,
        sender: Sender | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self.webhooks = settings.webhooks
        self.endpoints = list(self.webhooks.endpoints)
        self.policy = EgressPolicy.from_settings(self.webhooks)
        self.failures = StageFailures(STAGE, settings.topics.dlq)
        self._sender: Sender = sender or HttpxSender()
        self._resolve: Resolver = resolver or dns_resolve
        # The latest delivery outcomes (bounded), and counts by endpoint and result.
        self.recent: deque[DeliveryOutcome] = deque(maxlen=1024)
        self.counts: Counter[tuple[int, bool]] = Counter()
        self._loop = asyncio.new_event_loop()
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhooks-loop", daemon=True)
        self._thread.start()
        for index, endpoint in enumerate(self.endpoints):
            try:
                self.policy.check_url(endpoint.url)
            except WebhookNotAllowed as exc:
                log.warning("webhooks: endpoint %d: %s; its deliveries are dead-lettered", index, exc.message)

    # -- the runner's side -------------------------------------------------------------
    def submit(self, records: Sequence[RawRecord], emit: Emit) -> Future[list[OutRecord]]:
        # Cancelling this future (the runner abandoning the batch) cancels its deliveries.
        return asyncio.run_coroutine_threadsafe(self._batch(list(records)), self._loop)

    def close(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            closer = getattr(self._sender, "aclose", None)
            if closer is not None:
                await closer()

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
            except Exception as exc:  # closing must not fail the stage's shutdown
                log.warning("webhooks: closing the HTTP client: %r", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    # -- one batch ---------------------------------------------------------------------
    async def _batch(self, records: list[RawRecord]) -> list[OutRecord]:
        outputs: list[OutRecord] = []
        work: list[tuple[RawRecord, Awaitable[DeliveryOutcome]]] = []
        for record in records:
            try:
                event = decode_indexed(record.value)
            except InvalidRecord as exc:
                outputs.append(self.failures.reject(record, exc.error_type, str(exc)))
                continue
            work.extend((record, self._deliver(d)) for d in plan_deliveries(event, self.endpoints))
        results = await asyncio.gather(*(coroutine for _, coroutine in work))
        for (record, _), outcome in zip(work, results, strict=True):
            self.recent.append(outcome)
            self.counts[(outcome.delivery.endpoint_index, outcome.delivered)] += 1
            if not outcome.delivered:
                failed = outcome.delivery.event
                outputs.append(dead_letter(
                    STAGE, self.settings.topics.dlq, record, outcome.error_type, outcome.failure_message(),
                    document_id=failed.document_id, version=failed.version))
        return outputs

    async def _deliver(self, delivery: Delivery) -> DeliveryOutcome:
        semaphore = self._semaphores.setdefault(
            delivery.endpoint_index, asyncio.Semaphore(self.webhooks.concurrency_per_endpoint))
        started = time.monotonic()
        attempts = 0

        async def attempt() -> AttemptResult:
            nonlocal attempts
            attempts += 1
            async with semaphore:
                return await self._attempt(delivery)

        retrying = AsyncRetrying(
            **retry_policy(self.webhooks),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else AttemptResult(),
            before_sleep=lambda state: log.info(
                "webhooks: %s for %s to endpoint %d; retrying in %.2fs", _last(state).describe(),
                delivery.webhook_id, delivery.endpoint_index, state.upcoming_sleep),
        )
        last: AttemptResult = await retrying(attempt)
        delivered = last.status is not None and 200 <= last.status < 300 and not last.refused
        if delivered:
            log.debug("webhooks: %s delivered to endpoint %d after %d attempt(s)",
                      delivery.webhook_id, delivery.endpoint_index, attempts)
        return DeliveryOutcome(delivery, delivered, attempts, time.monotonic() - started, last)

    async def _attempt(self, delivery: Delivery) -> AttemptResult:
        try:
            target = self.policy.check_url(delivery.endpoint.url)
        except WebhookNotAllowed as exc:
            return AttemptResult(error=exc.message, refused=True)
        try:
            resolved = await self._resolve(target.host, target.port)
        except OSError as exc:
            return AttemptResult(error=f"DNS lookup of {target.host} failed: {exc}")
        try:
            addresses = self.policy.check_addresses(target, resolved)
        except WebhookNotAllowed as exc:
            return AttemptResult(error=exc.message, refused=True)
        headers = signed_headers(delivery, datetime.now(UTC))
        try:
            status, response_headers = await self._sender(
                target, addresses[0], headers, delivery.body, self.webhooks.timeout_s)
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            return AttemptResult(error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        except Exception as exc:
            # Whatever else a receiver provokes in the client is that delivery's failure, not the stage's.
            log.warning("webhooks: unexpected client error for endpoint %d: %r", delivery.endpoint_index, exc)
            return AttemptResult(error=f"{type(exc).__name__}: {exc}")
        return AttemptResult(
            status=status,
            retry_after_s=parse_retry_after(response_headers.get("retry-after")),
            location=response_headers.get("location") if 300 <= status < 400 else None,
        )


def _last(state: Any) -> AttemptResult:
    outcome = state.outcome
    result = outcome.result() if outcome is not None and not outcome.failed else None
    return result if isinstance(result, AttemptResult) else AttemptResult(error="no answer")


def build_webhooks(
    settings: ColstreamSettings,
    *,
    sender: Sender | None = None,
    resolver: Resolver | None = None,
    **runner_options: Any,
) -> StageRunner:
    """``sender``/``resolver`` replace the HTTP client and DNS (tests); ``runner_options``
    go to :class:`StageRunner` (injected clients in tests)."""
    tunables = settings.webhooks
    if not tunables.endpoints:
        log.info("webhooks: no endpoints configured (COLSTREAM_WEBHOOKS__ENDPOINTS); events are committed unsent")
    # A rebalance waits for the deliveries in flight (the runner settles before it gives
    # partitions up), so one delivery's bound must stay inside the poll interval.
    worst_s = tunables.retry_for_s + tunables.timeout_s
    if worst_s * 1000 >= settings.kafka.max_poll_interval_ms:
        log.warning("webhooks: retry_for_s + timeout_s (%.0fs) reaches max.poll.interval.ms (%.0fs): a rebalance "
                    "during a long retry may cost this member its partitions", worst_s,
                    settings.kafka.max_poll_interval_ms / 1000)
    handler = WebhooksHandler(settings, sender=sender, resolver=resolver)
    return StageRunner(
        settings,
        handler,
        topics=[settings.topics.indexed],
        group_id=f"{settings.consumer_group_prefix}webhooks",
        batch_size=tunables.batch_size,
        batch_timeout_ms=tunables.batch_timeout_ms,
        max_in_flight=tunables.max_in_flight,
        **runner_options,
    )
