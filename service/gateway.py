"""The gateway: routes generation requests to remote workers, fans control calls out to all.

One shared httpx.AsyncClient for every upstream call, over KeepAliveTransport (below).
Generation bodies are forwarded byte for byte (the worker validates them; its status and error
body come back unchanged); the gateway parses the JSON only to find the routing key
(routing.routing_key) and whether to stream. A background task checks /health of every
worker; `health_failures` failed checks in a row (or one refused connection while forwarding)
take a worker out of the ring, and its groups move to their ring successors until it passes a
check again. A request whose connection to a worker is refused is retried once on the next
choice. No FastAPI here: gateway_app.py wraps these results in responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from service.errors import (
    InvalidRequest,
    Overloaded,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
    error_for_status,
    error_response,
)
from service.limits import KeyBudget, requested_samples
from service.metrics import Metrics
from service.routing import build_ring, pick_worker, routing_key
from service.settings import Settings
from service.sglang_plugin import upstream as sglang_upstream

log = logging.getLogger(__name__)

_FORWARDED_HEADERS = ("x-session-id", "x-request-id")
BROADCAST_PATHS = (
    "/abort_request",
    "/pause_generation",
    "/continue_generation",
    "/update_weights_from_disk",
    "/flush_cache",
)


@dataclass(slots=True)
class Upstream:
    url: str
    sglang: bool = False  # an SGLang server (service/sglang_plugin/upstream.py translates)
    healthy: bool = True
    failures: int = 0  # consecutive failed health checks
    inflight: int = 0
    version: str | None = None  # the policy version it last reported (None: not reported)
    catching_up: bool = False  # the last update is being re-sent to it (see _catch_up)
    catch_up_failures: int = 0  # failed catch-ups in a row
    catch_up_after: float = 0.0  # time.monotonic() before which no catch-up is tried again


@dataclass(slots=True)
class Forwarded:
    """A worker's answer: a whole body, or a byte stream (SSE) the caller must drain."""

    status: int
    content_type: str
    worker: str
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    retry_after: str | None = None  # a full worker's Retry-After (429), passed on


def check_keys(settings: Settings) -> None:
    """Refuse a gateway that would forward every call to workers that refuse it: one with an
    API key of its own (so its workers, started from the same deployment, have one too) and
    none to send them."""
    if (settings.api_key or settings.client_api_keys) and not settings.worker_api_key:
        raise ValueError(
            "the gateway has an API key (--api-key, DAS_API_KEY, or --client-api-key) but "
            "none for its workers: give --worker-api-key (DAS_WORKER_API_KEY), the key the "
            "workers require"
        )


class Gateway:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        if not settings.worker_urls and not settings.sglang_worker_urls:
            raise ValueError("the gateway needs at least one worker URL")
        check_keys(settings)
        self.settings = settings
        self.metrics = metrics
        self.workers = {url: Upstream(url) for url in settings.worker_urls}
        self.workers |= {url: Upstream(url, sglang=True) for url in settings.sglang_worker_urls}
        urls = [*settings.worker_urls, *settings.sglang_worker_urls]
        self.ring = build_ring(urls, settings.routing_vnodes)  # refuses a URL given twice
        self._headers = {"content-type": "application/json"}
        if settings.worker_api_key:
            self._headers["authorization"] = f"Bearer {settings.worker_api_key}"
        self._control_headers = dict(self._headers)  # control calls: the workers' admin key
        if settings.worker_admin_api_key:
            self._control_headers["authorization"] = f"Bearer {settings.worker_admin_api_key}"
        self.key_budget = KeyBudget(settings.max_inflight_samples_per_key)
        self._client: httpx.AsyncClient | None = None
        self._transport: KeepAliveTransport | None = None
        self._health_task: asyncio.Task[None] | None = None
        self.announced: str | None = None  # the policy version its weight updates reached
        # The update body that reached the announced version, with that version set: what
        # brings a worker on another version to it (None: no update through this gateway yet).
        self._last_update: bytes | None = None
        self._catch_ups: set[asyncio.Task[None]] = set()
        for url in self.workers:
            metrics.worker_up.labels(worker=url).set(1)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the gateway is not started")
        return self._client

    async def start(self) -> None:
        self._transport = KeepAliveTransport()
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.settings.upstream_timeout_s, connect=2.0),
            transport=self._transport,
        )
        await self.check_health()
        # A gateway (re)started beside running workers announces the newest version they
        # report: one behind it (restarted, or it missed an update) is held out from the start.
        reported = [w.version for w in self.workers.values() if w.version is not None]
        if reported:
            self.announced = max(reported, key=sglang_upstream.version_order)
            if self.skew():
                await self._adopt_update()
        self._health_task = asyncio.create_task(self._health_loop(), name="gateway-health")

    async def _adopt_update(self) -> None:
        """A gateway started after an update it did not send has none to re-send to a worker
        behind: it takes the one a worker on the announced version last loaded (the
        weights_path its /get_server_info reports), set to that version."""
        for url, worker in self.workers.items():
            if worker.sglang or not worker.healthy or worker.version != self.announced:
                continue
            try:
                response = await self.client.get(
                    url + "/get_server_info", headers=self._control_headers, timeout=2.0
                )
            except httpx.HTTPError:
                continue
            info = _json(response)
            path = info.get("weights_path") if isinstance(info, dict) else None
            if response.status_code == 200 and isinstance(path, str) and path:
                assert self.announced is not None
                update = json.dumps({"model_path": path}).encode()
                self._last_update = _update_to(update, self.announced)
                log.warning(
                    "%s were behind at start-up: catching them up with %s's last update",
                    ", ".join(self.skew()), self.worker_name(url),
                )  # fmt: skip
                return

    async def close(self) -> None:
        for task in [self._health_task, *self._catch_ups]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._client is not None:
            await self._client.aclose()

    def worker_name(self, url: str) -> str:
        """What clients are told of a worker: its place in the --worker list, not its URL."""
        return f"worker-{list(self.workers).index(url)}"

    # -- routing ------------------------------------------------------------------------

    def healthy(self) -> list[str]:
        return [url for url, w in self.workers.items() if w.healthy]

    def in_policy(self, worker: Upstream) -> bool:
        """Whether the worker serves the policy version this gateway announces (the one its
        last weight update reached); one that reports another (it missed an update, or came
        back at its start-up version) is held out of routing, never served beside it."""
        return self.announced is None or worker.version in (None, self.announced)

    def routable(self) -> list[str]:
        return [url for url, w in self.workers.items() if w.healthy and self.in_policy(w)]

    def skew(self) -> list[str]:
        """The workers (by name) that report a policy version other than the announced."""
        return [self.worker_name(url) for url, w in self.workers.items() if not self.in_policy(w)]

    def choose(self, key: str, exclude: str | None = None) -> Upstream:
        routable = [url for url in self.routable() if url != exclude]
        loads = {url: w.inflight for url, w in self.workers.items()}
        url = pick_worker(self.ring, key, loads, routable, self.settings.routing_load_factor)
        if url is None:
            if self.healthy():
                raise Unavailable(f"no healthy worker on policy version {self.announced}")
            raise Unavailable("no healthy worker")
        return self.workers[url]

    # -- generation ---------------------------------------------------------------------

    def _admit(self, client: str, samples: int) -> Callable[[], None]:
        """KeyBudget.acquire, counted: the key's samples in flight and its 429s."""
        budget, metrics = self.key_budget, self.metrics
        try:
            give_back = budget.acquire(client, samples)
        except Overloaded:
            metrics.key_rejected.labels(client=client).inc()
            raise
        gauge = metrics.key_samples.labels(client=client)
        gauge.set(budget.inflight.get(client, 0))

        def release() -> None:
            give_back()
            gauge.set(budget.inflight.get(client, 0))

        return release

    async def forward(
        self, path: str, body: bytes, headers: Mapping[str, str], client: str = "anonymous"
    ) -> Forwarded:
        """Route one generation request; `client` (the caller's API key, by name) is admitted
        first against its own budget of samples (KeyBudget), held until the answer is sent."""
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidRequest(f"invalid JSON body: {error}") from error
        except RecursionError as error:  # nested deeper than the parser's stack
            raise InvalidRequest("invalid JSON body: nested too deeply") from error
        if not isinstance(parsed, dict):
            raise InvalidRequest("the body must be a JSON object")
        key = routing_key(headers.get("x-session-id"), parsed)
        stream = bool(parsed.get("stream"))
        upstream_headers = dict(self._headers)
        for name in _FORWARDED_HEADERS:
            value = headers.get(name)
            if value is not None:
                upstream_headers[name] = value
        group = parsed.get("prompt_group") or headers.get("x-session-id")
        release = self._admit(client, requested_samples(path, parsed))
        try:
            forwarded = await self._route(path, body, parsed, key, group, upstream_headers, stream)
        except BaseException:
            release()
            raise
        if forwarded.stream is None:
            release()
        else:
            forwarded.stream = _releasing(forwarded.stream, release)
            # A stream the client left before its first chunk is never iterated (its finally
            # never runs): its samples come back when it is collected.
            weakref.finalize(forwarded.stream, release)
        return forwarded

    async def _route(
        self,
        path: str,
        body: bytes,
        parsed: dict[str, Any],
        key: str,
        group: Any,
        upstream_headers: dict[str, str],
        stream: bool,
    ) -> Forwarded:
        """Send to the chosen worker; a connection refused or lost before any answer is
        retried once on the next choice."""

        def body_for(worker: Upstream) -> bytes:
            if not worker.sglang:
                return body
            explicit = group if isinstance(group, str) else None
            return sglang_upstream.generation_body(path, parsed, explicit)

        worker = self.choose(key)
        try:
            return await self._send(worker, path, body_for(worker), upstream_headers, stream)
        except httpx.ConnectError:
            self._mark_down(worker, "connection refused")
        except _NoAnswer:  # it went away before answering: nothing reached the client yet
            self._mark_down(worker, "connection lost before an answer")
        retry = self.choose(key, exclude=worker.url)
        try:
            return await self._send(retry, path, body_for(retry), upstream_headers, stream)
        except httpx.ConnectError as error:
            self._mark_down(retry, "connection refused")
            raise UpstreamError(f"{self.worker_name(retry.url)} is unreachable") from error
        except _NoAnswer as error:
            self._mark_down(retry, "connection lost before an answer")
            raise UpstreamError(f"{self.worker_name(retry.url)} failed: no answer") from error

    async def _send(
        self, worker: Upstream, path: str, body: bytes, headers: dict[str, str], stream: bool
    ) -> Forwarded:
        url = worker.url
        inflight = self.metrics.upstream_inflight.labels(worker=url)
        worker.inflight += 1
        inflight.inc()
        try:
            request = self.client.build_request("POST", url + path, content=body, headers=headers)
            response = await self.client.send(request, stream=stream)
        except (httpx.ConnectError, asyncio.CancelledError):  # refused, or the client left
            worker.inflight -= 1
            inflight.dec()
            raise
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as error:
            worker.inflight -= 1
            inflight.dec()
            self.metrics.upstream_requests.labels(worker=url, status="error").inc()
            raise _NoAnswer from error
        except httpx.HTTPError as error:
            worker.inflight -= 1
            inflight.dec()
            self.metrics.upstream_requests.labels(worker=url, status="error").inc()
            raise _upstream_error(self.worker_name(url), error) from error
        self.metrics.upstream_requests.labels(worker=url, status=str(response.status_code)).inc()
        content_type = response.headers.get("content-type", "application/json")
        retry_after = response.headers.get("retry-after")
        if not stream:
            worker.inflight -= 1
            inflight.dec()
            return Forwarded(
                response.status_code, content_type, url, response.content, None, retry_after
            )

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for part in response.aiter_raw():
                    yield part
            except httpx.HTTPError as error:  # the worker went away mid-stream: say so
                self._mark_down(worker, f"stream lost: {type(error).__name__}")
                failure = _upstream_error(self.worker_name(url), error)
                yield f"data: {error_response(failure).model_dump_json()}\n\n".encode()
            finally:
                await response.aclose()
                worker.inflight -= 1
                inflight.dec()

        return Forwarded(response.status_code, content_type, url, b"", relay(), retry_after)

    async def get(self, path: str, key: str = "") -> Forwarded:
        worker = self.choose(key)
        try:
            response = await self.client.get(worker.url + path, headers=self._headers)
        except httpx.HTTPError as error:
            raise _upstream_error(self.worker_name(worker.url), error) from error
        return Forwarded(
            response.status_code,
            response.headers.get("content-type", "application/json"),
            worker.url,
            body=response.content,
        )

    # -- control ------------------------------------------------------------------------

    async def broadcast(self, method: str, path: str, body: bytes = b"") -> dict[str, Any]:
        """Send a control call to every healthy worker; {"success", "workers": {url: reply},
        "skipped": [names of the workers out of routing]}, or an error: the workers' own (by
        status) if they all agree it is a client error, else UpstreamError (502). A worker
        that does not answer within control_timeout_s (frozen, say) fails the call and is
        taken out of routing. A weight update goes to every worker, healthy or not, and may
        take upstream_timeout_s: one a worker misses fails the call (502), never silently."""
        timeout = self.settings.control_timeout_s
        live = self.healthy()
        if path == "/update_weights_from_disk":
            timeout = self.settings.upstream_timeout_s
            live = list(self.workers)
        if not live:
            raise Unavailable("no healthy worker")

        async def call(url: str, method: str, path: str, body: bytes) -> tuple[str, int, Any]:
            try:
                response = await self.client.request(
                    method,
                    url + path,
                    content=body or None,
                    headers=self._control_headers,
                    timeout=httpx.Timeout(timeout, connect=2.0),
                )
            except httpx.HTTPError as error:
                if isinstance(error, httpx.TimeoutException | httpx.ConnectError):
                    frozen = isinstance(error, httpx.ReadTimeout)
                    self._mark_down(self.workers[url], f"{path}: {type(error).__name__}", frozen)
                return url, 502, {"error": type(error).__name__}
            try:
                return url, response.status_code, response.json()
            except ValueError:
                return url, response.status_code, {"body": response.text}

        async def one(url: str) -> tuple[str, int, Any]:
            if not self.workers[url].sglang:
                return await call(url, method, path, body)
            return await self._sglang_control(url, method, path, body, call)

        replies = await asyncio.gather(*(one(url) for url in live))
        if path in ("/update_weights_from_disk", "/get_weight_version"):
            self._note_versions(path, body, replies)
        failed = [(url, status, reply) for url, status, reply in replies if status >= 400]
        if failed:
            prefix = f"{len(failed)} of {len(replies)} workers failed"
            statuses = {status for _, status, _ in failed}
            status = statuses.pop() if len(statuses) == 1 and len(failed) == len(replies) else 502
            if status < 500:  # every worker refused the call alike: the caller's error
                reply = failed[0][2]
                raise error_for_status(status)(f"{prefix}: {_message(reply)}", _param(reply))
            detail = "; ".join(  # worker names, never their URLs (see worker_name)
                f"{self.worker_name(url)}: {status} {_message(reply)}"
                for url, status, reply in failed
            )
            raise UpstreamError(f"{prefix}: {detail}")
        return {
            "success": True,
            "workers": {url: reply for url, _, reply in replies},
            "skipped": [self.worker_name(url) for url in self.workers if url not in live],
        }

    def _note_versions(self, path: str, body: bytes, replies: list[tuple[str, int, Any]]) -> None:
        """The versions the workers answered; after a weight update, the newest one reached
        becomes the announced version (workers left behind are then held out, and caught up
        by check_health) and the update, set to that version, the one a catch-up re-sends."""
        reached = []
        for url, status, reply in replies:
            version = reply.get("weight_version") if isinstance(reply, dict) else None
            if status < 400 and version is not None:
                self.workers[url].version = str(version)
                reached.append(str(version))
        if path == "/update_weights_from_disk" and reached:
            self.announced = max(reached, key=sglang_upstream.version_order)
            self._last_update = _update_to(body, self.announced)
            for worker in self.workers.values():  # a new version: every worker may try at once
                worker.catch_up_failures, worker.catch_up_after = 0, 0.0
            for name in self.skew():
                log.warning("%s is not on policy version %s: held out", name, self.announced)

    async def _sglang_control(
        self,
        url: str,
        method: str,
        path: str,
        body: bytes,
        call: Callable[[str, str, str, bytes], Awaitable[tuple[str, int, Any]]],
    ) -> tuple[str, int, Any]:
        """A control call to an SGLang worker, answered in our workers' shape."""
        if path == "/get_weight_version":
            url, status, info = await call(url, "GET", sglang_upstream.WEIGHT_VERSION_PATH, b"")
            if status >= 400:
                return url, status, info
            return url, status, {"weight_version": sglang_upstream.weight_version(info)}
        if path == "/update_weights_from_disk":
            body = sglang_upstream.update_body(body, self.announced)
        url, status, reply = await call(url, method, path, sglang_upstream.control_body(path, body))
        if path == "/update_weights_from_disk" and status < 400 and isinstance(reply, dict):
            _, info_status, info = await call(url, "GET", sglang_upstream.WEIGHT_VERSION_PATH, b"")
            if info_status < 400:
                reply = {**reply, "weight_version": sglang_upstream.weight_version(info)}
        if status == 200 and reply == {"body": ""}:  # SGLang's /abort_request has no body
            reply = {"success": True}
        return url, status, reply

    async def check_health(self) -> None:
        async def one(worker: Upstream) -> None:
            frozen = False  # it took the connection but did not answer (SIGSTOP, a hung loop)
            try:
                response = await self.client.get(worker.url + "/health", timeout=2.0)
                ok = response.status_code == 200
            except httpx.HTTPError as error:
                ok, frozen = False, isinstance(error, httpx.ReadTimeout)
            if ok:
                reported = await self._worker_version(worker, response)
                if reported is not None:
                    worker.version = reported
                if not worker.healthy:
                    log.warning("worker %s is back", worker.url)
                worker.healthy, worker.failures = True, 0
                self.metrics.worker_up.labels(worker=worker.url).set(1)
                if self._should_catch_up(worker):
                    task = asyncio.create_task(self._catch_up(worker), name="gateway-catch-up")
                    self._catch_ups.add(task)
                    task.add_done_callback(self._catch_ups.discard)
            else:
                worker.failures += 1
                if worker.failures >= self.settings.health_failures:
                    self._mark_down(worker, "failed health checks", drop=frozen)

        await asyncio.gather(*(one(worker) for worker in self.workers.values()))

    async def _worker_version(self, worker: Upstream, response: httpx.Response) -> str | None:
        """The weight version a worker's answer (/health, an update) reports; an SGLang
        worker's answers carry none, so it is read from its /model_info."""
        if not worker.sglang:
            return _reported_version(response)
        try:
            response = await self.client.get(
                worker.url + sglang_upstream.WEIGHT_VERSION_PATH, timeout=2.0
            )
        except httpx.HTTPError:
            return None
        version = sglang_upstream.weight_version(_json(response))
        return version if response.status_code == 200 and version else None

    def _should_catch_up(self, worker: Upstream) -> bool:
        """A healthy worker that reports a policy version other than the announced one, when
        this gateway has the update that reached it and no try is under way or backing off."""
        return (
            self._last_update is not None
            and worker.version is not None
            and worker.version != self.announced
            and not worker.catching_up
            and time.monotonic() >= worker.catch_up_after
        )

    async def _catch_up(self, worker: Upstream) -> None:
        """Re-send the last update, set to the announced version, to this worker alone. It
        stays out of routing until its /health reports that version (in_policy); a failure is
        logged and tried again on a later health check, the wait doubling each time."""
        body, version, name = self._last_update, self.announced, self.worker_name(worker.url)
        if body is None or version is None:
            return
        worker.catching_up = True
        if worker.sglang:
            body = sglang_upstream.update_body(body, None)  # the version, as SGLang takes it
        try:
            response = await self.client.post(
                worker.url + "/update_weights_from_disk",
                content=body,
                headers=self._control_headers,
                timeout=httpx.Timeout(self.settings.upstream_timeout_s, connect=2.0),
            )
            reached = None
            if response.status_code == 200:
                reached = await self._worker_version(worker, response)
            why = f"{response.status_code} {_message(_json(response))}".strip()
        except httpx.HTTPError as error:
            reached, why = None, type(error).__name__
        finally:
            worker.catching_up = False
        caught_up = reached == version
        self.metrics.catch_ups.labels(
            worker=worker.url, outcome="caught_up" if caught_up else "failed"
        ).inc()
        if caught_up:
            worker.catch_up_failures, worker.catch_up_after = 0, 0.0
            log.warning("%s was caught up to policy version %s", name, version)
            return
        worker.catch_up_failures += 1
        wait = min(
            self.settings.health_interval_s * 2**worker.catch_up_failures,
            self.settings.catch_up_max_backoff_s,
        )
        worker.catch_up_after = time.monotonic() + wait
        log.warning(
            "%s: catch-up to policy version %s failed (%s); held out, next try in %.1f s",
            name, version, why, wait,
        )  # fmt: skip

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            await self.check_health()

    def _mark_down(self, worker: Upstream, why: str, drop: bool = False) -> None:
        """Take the worker out of routing. drop: it is frozen (it took a connection and did
        not answer), so its busy connections are dropped too; a worker that refuses new ones
        may be draining its answers (SIGTERM), which keep going."""
        if worker.healthy:
            log.warning("worker %s removed: %s", worker.url, why)
        if drop and self._transport is not None:  # what waits on it fails now, not in 600 s
            url = httpx.URL(worker.url)
            self._transport.drop((url.host, url.port or 80))
        worker.healthy = False
        self.metrics.worker_up.labels(worker=worker.url).set(0)


async def _releasing(
    stream: AsyncIterator[bytes], release: Callable[[], None]
) -> AsyncIterator[bytes]:
    try:
        async for part in stream:
            yield part
    finally:
        release()


class _NoAnswer(Exception):
    """The worker's connection failed before any of its answer arrived (its process died,
    say): the request may go to another worker."""


def _upstream_error(name: str, error: httpx.HTTPError) -> UpstreamError | UpstreamTimeout:
    if isinstance(error, httpx.TimeoutException):
        return UpstreamTimeout(f"{name} did not answer in time: {type(error).__name__}")
    return UpstreamError(f"{name} failed: {type(error).__name__}")


def _reported_version(response: httpx.Response) -> str | None:
    """The weight_version a worker's /health (or update) reports (ours do; an SGLang server's
    /health does not)."""
    body = _json(response)
    version = body.get("weight_version") if isinstance(body, dict) else None
    return None if version is None else str(version)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _update_to(body: bytes, version: str) -> bytes | None:
    """An update body set to policy `version`: our workers' versions are numbers (None
    otherwise, and for a body that is not a JSON object)."""
    try:
        update = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(update, dict) or not version.isdecimal():
        return None
    return json.dumps({**update, "weight_version": int(version)}).encode()


def _param(reply: Any) -> str | None:
    error = reply.get("error") if isinstance(reply, dict) else None
    param = error.get("param") if isinstance(error, dict) else None
    return param if isinstance(param, str) else None


def _message(reply: Any) -> str:
    if isinstance(reply, dict):
        error = reply.get("error")
        if isinstance(error, dict):
            return str(error.get("message", ""))
        if error is not None:
            return str(error)
    return ""


# -- transport --------------------------------------------------------------------------------


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """A lean HTTP/1.1 keep-alive transport for plain-http upstreams, behind httpx's API.

    httpcore's pool rescans every connection for every request (quadratic in concurrency: at
    64 concurrent requests it dominated the gateway's CPU); here each origin keeps a stack of
    idle connections, so taking and returning one is O(1). Responses with Content-Length are
    read whole; chunked ones (SSE) are de-chunked as they arrive. A reused connection that
    the server closed while idle is retried once on a fresh one (nothing reached the worker).
    """

    def __init__(self, max_idle_per_origin: int = 512) -> None:
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._busy: dict[tuple[str, int], set[_Conn]] = {}
        self._max_idle = max_idle_per_origin

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"only http:// upstreams: {url}", request=request)
        origin = (url.host, url.port or 80)
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()
        head = [f"{request.method} {url.raw_path.decode()} HTTP/1.1\r\n".encode()]
        for name, value in request.headers.raw:
            if name.lower() not in (b"content-length", b"transfer-encoding", b"connection"):
                head.append(name + b": " + value + b"\r\n")
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        payload = b"".join(head) + body
        idle = self._idle.setdefault(origin, [])
        while idle:
            conn = idle.pop()
            if conn.reader.at_eof():
                conn.close()
                continue
            try:
                return await self._exchange(conn, origin, payload, request, timeouts)
            except _StaleConnection:
                continue
        conn = await self._connect(origin, request, timeouts.get("connect"))
        try:
            return await self._exchange(conn, origin, payload, request, timeouts)
        except _StaleConnection as error:
            raise httpx.ReadError("the worker closed the connection", request=request) from error

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def _connect(
        self, origin: tuple[str, int], request: httpx.Request, timeout: float | None
    ) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*origin, limit=2**20), timeout
            )
        except TimeoutError as error:
            raise httpx.ConnectTimeout(f"connect to {origin} timed out", request=request) from error
        except OSError as error:
            raise httpx.ConnectError(str(error), request=request) from error
        return _Conn(reader, writer, self._busy.setdefault(origin, set()))

    def drop(self, origin: tuple[str, int]) -> None:
        """Close every connection to `origin` with an exchange under way (its worker is out of
        routing, frozen say): a request still waiting for its answer fails with ReadError
        (the gateway retries it elsewhere), a stream ends with an error event."""
        for conn in list(self._busy.get(origin, ())):
            conn.dropped = True
            conn.writer.close()

    async def _exchange(
        self,
        conn: _Conn,
        origin: tuple[str, int],
        payload: bytes,
        request: httpx.Request,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        read_timeout = timeouts.get("read")
        conn.busy.add(conn)
        try:
            conn.writer.write(payload)
            await conn.writer.drain()
            head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), read_timeout)
        except asyncio.CancelledError:  # our client left: the worker sees this one leave too
            conn.close()
            raise
        except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError) as error:
            conn.close()
            if conn.dropped:  # not stale: never resend to a worker out of routing
                raise httpx.ReadError(
                    "the worker was taken out of routing", request=request
                ) from error
            if isinstance(error, asyncio.IncompleteReadError) and error.partial:
                raise httpx.ReadError("truncated response head", request=request) from error
            raise _StaleConnection from error
        except TimeoutError as error:
            conn.close()
            raise httpx.ReadTimeout("the worker did not answer in time", request=request) from error
        except (OSError, asyncio.LimitOverrunError) as error:
            conn.close()
            raise httpx.ReadError(str(error), request=request) from error
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0][9:12])
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = False
        keep_alive = True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip(), value.strip()
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
                continue  # the body handed on is de-chunked
            elif lower == b"connection" and value.lower() == b"close":
                keep_alive = False
            headers.append((name, value))

        def keep() -> None:
            self._release(origin, conn)

        release: Callable[[], None] = keep if keep_alive else conn.close
        if chunked:
            stream: httpx.AsyncByteStream = _ChunkedStream(conn, release, read_timeout, request)
        else:
            try:
                if length is None:
                    content = await asyncio.wait_for(conn.reader.read(), read_timeout)
                    release = conn.close
                else:
                    content = await asyncio.wait_for(conn.reader.readexactly(length), read_timeout)
            except asyncio.CancelledError:
                conn.close()
                raise
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
                conn.close()
                raise httpx.ReadError("truncated response body", request=request) from error
            release()
            stream = httpx.ByteStream(content)
        return httpx.Response(
            status, headers=headers, stream=stream, extensions={"http_version": b"HTTP/1.1"}
        )

    def _release(self, origin: tuple[str, int], conn: _Conn) -> None:
        conn.busy.discard(conn)
        idle = self._idle.setdefault(origin, [])
        if len(idle) < self._max_idle:
            idle.append(conn)
        else:
            conn.close()


class _StaleConnection(Exception):
    """A kept-alive connection the server had closed before our request reached it."""


@dataclass(slots=True, eq=False)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    busy: set[_Conn]  # its origin's connections with an exchange under way
    dropped: bool = False  # closed by drop(): its worker was taken out of routing

    def close(self) -> None:
        self.writer.close()
        self.busy.discard(self)


class _ChunkedStream(httpx.AsyncByteStream):
    def __init__(
        self,
        conn: _Conn,
        release: Callable[[], None],
        timeout: float | None,
        request: httpx.Request,
    ) -> None:
        self._conn = conn
        self._release = release
        self._timeout = timeout
        self._request = request
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader = self._conn.reader
        try:
            while True:
                size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), self._timeout)
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers from uvicorn
                    self._done = True
                    return
                data = await asyncio.wait_for(reader.readexactly(size + 2), self._timeout)
                yield data[:-2]
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as error:
            raise httpx.ReadError("truncated chunked body", request=self._request) from error

    async def aclose(self) -> None:
        if self._done:
            self._release()
        else:
            self._conn.close()  # abandoned mid-body: the connection cannot be reused
