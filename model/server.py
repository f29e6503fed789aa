"""The model server's HTTP layer (CONTRACT.md, Model server HTTP API): recommendations from a
`Recommender`, one feature event per item served, and action events accepted into their stream.

The event loop computes each recommendation itself (FRESHREC_SERVE_THREADS=0, the default) or
hands it to a pool of that many threads; index refreshes run in a thread of their own, so the
loop keeps answering while they compute. Feature events are assembled
from bytes kept per item (model/served_events.py) and go to their stream in one asynchronous
write per FEATURE_BATCH_S (flows/eventlog.py). Client input never gets a 5xx: every bad parameter
or body is a 4xx with a JSON reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import math
import multiprocessing
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import msgspec
from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from flows.config import Config
from flows.eventlog import EventLog, StreamDown, open_event_log
from flows.events import DEFAULT_MAX_FUTURE_S, ActionEvent, DeadLetter, encode, parse
from flows.heap import frozen_heap
from model.recommend_types import Recommender
from model.served_events import AnswerEncoder

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
DEFAULT_READ_TIMEOUT_S = 30.0
MAX_ACTIONS = 1000
MAX_K = 1000
DEFAULT_K = 20
MAX_ID_CHARS = 128
RETRY_AFTER_S = 1
SWITCH_INTERVAL_S = 0.001  # the GIL switch interval of a serving process (Python's default: 5 ms)
FEATURE_BATCH_S = 0.01  # feature events of the requests in this long go to the stream in one write
_K = re.compile(r"[0-9]{1,7}")  # ASCII digits only: int() would take " 5", "+5" and other scripts' digits
_ENDPOINTS = ("/recommend", "/actions", "/healthz", "/metrics", "/openapi.json")

APP_KEY = web.AppKey("freshrec_server", object)


class ServeMetrics:
    """The server's own figures, in a registry of its own (several servers may run in one test
    process); /metrics shows it together with the process-wide one (serving store, replica)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("freshrec_serve_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("freshrec_serve_request_latency_seconds", "time to answer, by endpoint",
                                 ["endpoint"], registry=r,
                                 buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.features_written = Counter("freshrec_serve_feature_events_written",
                                        "feature events the feature stream acknowledged", registry=r)
        self.features_failed = Counter("freshrec_serve_feature_events_failed",
                                       "feature events the feature stream did not take", registry=r)
        self.actions_accepted = Counter("freshrec_serve_actions_accepted", "action events accepted (202)",
                                        registry=r)
        self.actions_rejected = Counter("freshrec_serve_actions_rejected",
                                        "action events refused, by reason (invalid, stream_down, slow: a body not read in time)",
                                        ["reason"], registry=r)
        self.index_items = Gauge("freshrec_serve_index_items", "items in the recommender's index", registry=r)
        self.params_version = Gauge("freshrec_serve_params_version",
                                    "serving store version the recommender has applied", registry=r)
        self.refresh_errors = Counter("freshrec_serve_refresh_errors", "refreshes of the recommender that failed",
                                      registry=r)


def _error(status: int, message: str, headers: Optional[dict[str, str]] = None, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json")


class ModelServer:
    """Handlers and background work of one app; `create_app` wires it."""

    def __init__(self, recommender: Recommender, config: Config, actions: EventLog, features: EventLog,
                 *, threads: Optional[int] = None, clock: Callable[[], float] = time.time):
        self.recommender = recommender
        self.config = config
        self.actions = actions
        self.features = features
        self.clock = clock
        self.metrics = ServeMetrics()
        if threads is None:
            threads = getattr(config, "serve_threads", 0)
        if threads < 0:
            raise ValueError(f"threads must be 0 (on the event loop) or more, not {threads}")
        # 0: no pool. A hand-off to a pool thread and back cost about 0.2 ms of CPU here (two
        # thread wake-ups), and the threads then took turns at the GIL with the loop: at 200
        # requests/s over 100,000 items, two threads cost a fifth more CPU per request than none.
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="recommend") if threads else None
        self._refresh_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-refresh")
        self.max_future_s = getattr(config, "max_future_s", DEFAULT_MAX_FUTURE_S)
        self.read_timeout_s = getattr(config, "serve_read_timeout_s", DEFAULT_READ_TIMEOUT_S)
        self.token = config.api_token.encode() if config.api_token else None
        self._writes: set[asyncio.Task] = set()
        self._refresher: Optional[asyncio.Task] = None
        self.encoder = AnswerEncoder()
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count()
        self._pending: list[tuple[str, bytes]] = []  # feature events not yet handed to the stream
        self._flush_handle: Optional[asyncio.TimerHandle] = None

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self, _app: web.Application) -> None:
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def stop(self, _app: web.Application) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_features()  # every served item becomes a feature event, the last ones too
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        for stream in (self.features, self.actions):
            try:
                await stream.close()
            except Exception:  # closing one log must not keep the other open
                log.exception("closing an event log")
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self._refresh_pool.shutdown(wait=True)

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.config.serve_refresh_ms / 1000
        while True:
            try:
                await loop.run_in_executor(self._refresh_pool, self.recommender.refresh)
                self._publish_health()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.refresh_errors.inc()
                log.exception("refreshing the recommender")
            await asyncio.sleep(period)

    def _publish_health(self):
        h = self.recommender.health()
        self.metrics.index_items.set(h.items)
        self.metrics.params_version.set(h.params_version)
        return h

    # --- middleware ------------------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None and route.canonical in _ENDPOINTS else "other"
        try:
            response = await handler(request)
        except web.HTTPException as e:
            # aiohttp's own 404/405/413...: the same status, as JSON.
            headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
            reason = e.reason or "error"
            if e.status == 404:
                reason = f"no such path: {request.path}"
            elif e.status == 405:
                reason = f"method {request.method} not allowed here; allowed: {headers.get('Allow', '')}"
            response = _error(e.status, reason, headers)
        except Exception:
            log.exception("answering %s %s", request.method, request.path)
            response = _error(500, "internal error")
        self.metrics.requests.labels(endpoint, str(response.status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    # --- /recommend ------------------------------------------------------------------------
    async def recommend(self, request: web.Request) -> web.Response:
        query = request.query
        for name in ("user_id", "k"):
            if len(query.getall(name, ())) > 1:
                return _error(400, f"{name} is given more than once")
        user_id = query.get("user_id")
        if user_id is None:
            return _error(400, "missing query parameter user_id")
        if not 1 <= len(user_id) <= MAX_ID_CHARS:
            return _error(400, f"user_id must be 1 to {MAX_ID_CHARS} characters")
        try:
            user_id.encode("utf-8")
        except UnicodeEncodeError:
            return _error(400, "user_id is not valid UTF-8")
        raw_k = query.get("k")
        k = DEFAULT_K
        if raw_k is not None:
            if not _K.fullmatch(raw_k) or not 1 <= int(raw_k) <= MAX_K:
                return _error(400, f"k must be an integer from 1 to {MAX_K}")
            k = int(raw_k)
        if self.pool is None:
            request_id, body, lines = self._answer(user_id, k)
        else:  # numpy releases the GIL, so the event loop moves HTTP meanwhile
            request_id, body, lines = await asyncio.get_running_loop().run_in_executor(self.pool, self._answer,
                                                                                       user_id, k)
        if lines:
            self._log_features(request_id, lines)
        return web.Response(body=body, content_type="application/json")

    def _answer(self, user_id: str, k: int) -> tuple[str, bytes, list[bytes]]:
        """The request id, response body and feature event lines of one request."""
        rec = self.recommender.recommend(user_id, k)
        # Unique without a system call per request: a random prefix per server, then a counter.
        request_id = f"r-{self._id_prefix}{next(self._ids):016x}"
        body, lines = self.encoder.encode(request_id, user_id, str(rec.model_version), self.clock(),
                                          rec.items[:k], rec.user_sparse)
        return request_id, body, lines

    def _log_features(self, request_id: str, lines: list[bytes]) -> None:
        """Queues a request's feature events; the queue goes to the stream in one append every
        FEATURE_BATCH_S (one file write for every request in that time, not one per request)."""
        self._pending.extend([(request_id, line) for line in lines])
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(FEATURE_BATCH_S, self._flush_features)

    def _flush_features(self) -> None:
        self._flush_handle = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._write_features(batch))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write_features(self, events: list[tuple[str, bytes]]) -> None:
        # The client does not wait for this: a stream that is down costs the feature events (counted),
        # not the recommendation.
        try:
            await self.features.append(events, sync=False)
        except StreamDown as e:
            self.metrics.features_failed.inc(len(events))
            log.warning("feature events lost: %s", e)
        except Exception:
            self.metrics.features_failed.inc(len(events))
            log.exception("writing feature events")
        else:
            self.metrics.features_written.inc(len(events))

    # --- /actions --------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                  self.token)

    async def _read_body(self, request: web.Request) -> Optional[bytes]:
        """The body, or None when it is over MAX_BODY_BYTES (declared or as it streams in);
        TimeoutError when it has not all come within the read timeout (a slow client);
        aiohttp's RequestPayloadError when it cannot be read (its chunked framing or its
        Content-Encoding broken: aiohttp decompresses gzip, deflate and br bodies itself)."""
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return None
        chunks = []
        size = 0
        async with asyncio.timeout(self.read_timeout_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    return None
                chunks.append(chunk)
        return b"".join(chunks)

    async def post_actions(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "POST /actions needs Authorization: Bearer <token>",
                          {"WWW-Authenticate": 'Bearer realm="freshrec"'})
        try:
            body = await self._read_body(request)
        except TimeoutError:
            self.metrics.actions_rejected.labels("slow").inc()
            response = _error(408, f"body not read within {self.read_timeout_s:g} s (FRESHREC_SERVE_READ_TIMEOUT_S)")
            # Sent now, and the connection ended: aiohttp would otherwise linger up to 10 s more
            # reading the rest of the slow body.
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
            return response
        except web.RequestPayloadError as e:
            self.metrics.actions_rejected.labels("invalid").inc()
            return _error(400, f"body could not be read: {e}")
        if body is None:
            return _error(413, f"body larger than {MAX_BODY_BYTES} bytes")
        now = self.clock()
        raws, problem = _split_events(body)
        if problem is not None:
            self.metrics.actions_rejected.labels("invalid").inc(max(1, len(raws)))
            return _error(400, problem)
        accepted: list[ActionEvent] = []
        invalid = []
        for i, raw in enumerate(raws):
            # The flow's parser decides, except that "from the future" is measured from our
            # arrival time (which the stream gets), never from a received_at the client sent.
            event = parse("actions", raw, now, max_future_s=math.inf)
            if isinstance(event, DeadLetter):
                invalid.append({"index": i, "reason": event.reason})
                continue
            if event.ts > now + self.max_future_s:
                invalid.append({"index": i, "reason": f"ts from the future: {event.ts - now:.0f} s ahead of its arrival"})
                continue
            event.received_at = now
            accepted.append(event)
        if invalid:
            self.metrics.actions_rejected.labels("invalid").inc(len(raws))
            return _json({"error": f"{len(invalid)} of {len(raws)} events are invalid; none was accepted",
                          "invalid": invalid}, status=400)
        try:
            await self.actions.append([(e.request_id, encode(e)) for e in accepted], sync=True)
        except StreamDown as e:
            self.metrics.actions_rejected.labels("stream_down").inc(len(accepted))
            return _error(503, f"the actions stream is down: {e}", {"Retry-After": str(RETRY_AFTER_S)})
        self.metrics.actions_accepted.inc(len(accepted))
        return _json({"accepted": len(accepted)}, status=202)

    # --- /healthz, /metrics, /openapi.json -------------------------------------------------
    async def healthz(self, _request: web.Request) -> web.Response:
        h = self._publish_health()
        streams = {"actions": "up" if self.actions.healthy() else "down",
                   "features": "up" if self.features.healthy() else "down"}
        return _json({"status": "ok" if all(v == "up" for v in streams.values()) else "degraded",
                      "params_version": h.params_version, "dense_version": h.dense_version,
                      "items": h.items, "freshness_ms": h.freshness_ms, "staleness_ms": h.staleness_ms,
                      "streams": streams})

    async def metrics_text(self, _request: web.Request) -> web.Response:
        try:
            self._publish_health()
        except Exception:
            log.exception("reading the recommender's health")
        body = generate_latest(self.metrics.registry) + generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(openapi_document())


def _split_events(body: bytes) -> tuple[list[bytes], Optional[str]]:
    """The raw bytes of each event in a body holding one event or an array of them, so each is
    validated by the flow's own parser exactly as the flow would see it."""
    stripped = body.lstrip(b" \t\r\n")
    if not stripped:
        return [], "empty body: expected an action event or a JSON array of them"
    if stripped[:1] != b"[":
        return [body], None  # one event; parse() names what is wrong with it
    try:
        raws = msgspec.json.decode(body, type=list[msgspec.Raw])
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        return [], f"not JSON: {str(e).removeprefix('JSON is malformed: ')}"
    if not raws:
        return [], "empty array: expected 1 to 1000 action events"
    if len(raws) > MAX_ACTIONS:
        return [], f"{len(raws)} events: at most {MAX_ACTIONS} per request"
    return [bytes(r) for r in raws], None


def create_app(recommender: Recommender, config: Config, *, actions_log: Optional[EventLog] = None,
               features_log: Optional[EventLog] = None, threads: Optional[int] = None,
               clock: Callable[[], float] = time.time) -> web.Application:
    """The aiohttp application. Event logs default to the configured streams (files or Kafka);
    the app closes them at cleanup. `threads`: FRESHREC_SERVE_THREADS unless given."""
    actions = actions_log if actions_log is not None else open_event_log("actions", config)
    features = features_log if features_log is not None else open_event_log("features", config)
    server = ModelServer(recommender, config, actions, features, threads=threads, clock=clock)
    # The body limit is ours (413 as JSON, chunked bodies too); aiohttp's is set above it.
    app = web.Application(middlewares=[server.middleware], client_max_size=MAX_BODY_BYTES + (64 << 10))
    app[APP_KEY] = server
    app.router.add_get("/recommend", server.recommend)
    app.router.add_post("/actions", server.post_actions)
    app.router.add_get("/healthz", server.healthz)
    app.router.add_get("/metrics", server.metrics_text)
    app.router.add_get("/openapi.json", server.openapi)
    app.on_startup.append(server.start)
    app.on_cleanup.append(server.stop)
    return app


# --- running it ------------------------------------------------------------------------------

def serve(recommender: Recommender, config: Config, host: str = "127.0.0.1", port: int = 8000,
          *, on_ready: Optional[Callable[[str], None]] = None, reuse_port: bool = False,
          **app_options: Any) -> None:
    """Serves until SIGINT or SIGTERM, then stops cleanly (event logs flushed, producers closed).
    `reuse_port`: bind with SO_REUSEPORT, so other server processes can share the port."""
    # The process is the server's: a thread that wants the GIL (the event loop, the index refresh,
    # a request's pool thread if there are any) waits at most 1 ms for it rather than Python's 5 ms, which
    # a request paid at each hand-off whenever another thread was busy.
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(create_app(recommender, config, **app_options), access_log=None,
                               keepalive_timeout=_read_timeout(config))
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
            await site.start()
            url = _base_url(runner)
            log.info("model server on %s", url)
            if on_ready is not None:
                on_ready(url)
            await stop.wait()
        finally:
            await runner.cleanup()

    # The catalog index (built by now) and whatever it builds later stay out of full collections,
    # which otherwise walk it whole with the GIL held (flows/heap.py).
    with frozen_heap():
        asyncio.run(main())


def serve_processes(factory: Callable[..., Recommender], config: Config, host: str = "127.0.0.1",
                    port: int = 8000, processes: int = 1, *, on_ready: Optional[Callable[[str], None]] = None,
                    start_timeout_s: float = 600.0) -> None:
    """`serve` in `processes` processes sharing one port (SO_REUSEPORT: the kernel spreads the
    connections), each with its own recommender from `factory(config)` (a module-level function:
    the other processes import it) and its own feature-event file. This process serves too, and
    starts the others once it listens (so port 0 works); `on_ready` runs once all of them listen.
    SIGINT or SIGTERM here stops them all cleanly; a server process whose parent dies stops too."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, not {processes}")
    if processes == 1:
        serve(factory(config), config, host, port, on_ready=on_ready)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and LMDB open
    children: list = []

    def started(url: str) -> None:
        bound = int(url.rsplit(":", 1)[1])
        for _ in range(processes - 1):
            ready = ctx.Event()
            child = ctx.Process(target=_serve_child, args=(factory, config, host, bound, ready),
                                name="freshrec-serve", daemon=True)
            child.start()
            children.append((child, ready))
        deadline = time.monotonic() + start_timeout_s
        for child, ready in children:
            while not ready.wait(0.1):
                if child.exitcode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"a model server process did not start (exit code {child.exitcode}); "
                                       "its log is above")
        if on_ready is not None:
            on_ready(url)

    try:
        serve(factory(config), config, host, port, on_ready=started, reuse_port=True)
    finally:
        for child, _ in children:
            if child.is_alive():
                child.terminate()  # SIGTERM: a clean stop, pending feature events written
        for child, _ in children:
            child.join(30)
            if child.is_alive():
                child.kill()
                child.join()


def _serve_child(factory: Callable[..., Recommender], config: Config, host: str, port: int, ready: Any) -> None:
    """One of `serve_processes`' other servers (in a spawned process)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = multiprocessing.parent_process()

    def orphaned() -> None:  # the parent died without stopping us (SIGKILL): stop as on SIGTERM
        if parent is not None:
            parent.join()
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, name="parent-watch", daemon=True).start()
    serve(factory(config), config, host, port, on_ready=lambda _url: ready.set(), reuse_port=True)


def _read_timeout(config: Config) -> float:
    # aiohttp (3.14, web_protocol.py) arms its keep-alive timer when a connection opens and again
    # after each response, and closes the connection if no whole request has come when it fires:
    # so it is also the time a client has to send its request line and headers. Bytes dribbled in
    # do not rearm it.
    return getattr(config, "serve_read_timeout_s", DEFAULT_READ_TIMEOUT_S)


def _base_url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class RunningServer:
    url: str
    app: web.Application

    @property
    def server(self) -> ModelServer:
        return self.app[APP_KEY]


@contextlib.contextmanager
def running_server(recommender: Recommender, config: Config, host: str = "127.0.0.1", port: int = 0,
                   **app_options: Any) -> Iterator[RunningServer]:
    """Runs the server on its own event loop in a background thread (port 0: a free one) and
    stops it cleanly on exit; for tests and the demo."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def start() -> None:
        app = create_app(recommender, config, **app_options)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=_read_timeout(config))
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        state.update(runner=runner, app=app, url=_base_url(runner))

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as e:  # reported to the caller's thread
            state["error"] = e
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(state["runner"].cleanup())
        loop.run_until_complete(loop.shutdown_asyncgens())

    thread = threading.Thread(target=run, name="model-server", daemon=True)
    thread.start()
    ready.wait()
    if "error" in state:
        thread.join()
        loop.close()
        raise state["error"]
    try:
        yield RunningServer(state["url"], state["app"])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


# --- the OpenAPI document --------------------------------------------------------------------

def _err_schema() -> dict:
    return {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}


def _resp(description: str, schema: Optional[dict] = None, headers: Optional[dict] = None) -> dict:
    r: dict[str, Any] = {"description": description}
    if schema is not None:
        r["content"] = {"application/json": {"schema": schema}}
    if headers:
        r["headers"] = headers
    return r


def _id(description: str) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS, "description": description}


def openapi_document() -> dict:
    """Hand-written: what the handlers above accept and answer, and nothing else."""
    err = {"$ref": "#/components/schemas/Error"}
    number = {"type": "number"}
    action = {
        "type": "object",
        "required": ["request_id", "user_id", "item_id", "ts", "action"],
        "properties": {
            "request_id": _id("the request that served the item"),
            "user_id": _id("the user"),
            "item_id": _id("the item"),
            "ts": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 4102444800,
                   "description": "event time, seconds since the Unix epoch; at most "
                                  "FRESHREC_MAX_FUTURE_S ahead of the server's clock"},
            "action": {"type": "string", "enum": ["click", "like", "share", "comment", "follow", "finish",
                                                  "purchase", "watch", "skip", "dislike"]},
            # The flow's parser takes null for an optional field, as if it were absent.
            "value": {"type": "number", "nullable": True, "description": "finite, e.g. seconds watched"},
            "event_id": {"type": "string", "nullable": True, "description": "a retry carries the same one"},
            "received_at": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "nullable": True,
                            "description": "replaced by the server's arrival time"},
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "freshrec model server", "version": "1.0.0",
                 "description": "Recommendations, feature events and action events (freshrec CONTRACT.md)."},
        "paths": {
            "/recommend": {"get": {
                "operationId": "recommend",
                "summary": "the top k items for a user; writes one feature event per item served",
                "parameters": [
                    {"name": "user_id", "in": "query", "required": True, "schema": _id("the user")},
                    {"name": "k", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_K}},
                ],
                "responses": {
                    "200": _resp("the ranked items", {"$ref": "#/components/schemas/Recommendation"}),
                    "400": _resp("a bad parameter", err),
                },
            }},
            "/actions": {"post": {
                "operationId": "postActions",
                "summary": "one action event or an array of 1 to 1000; all or nothing",
                "security": [{}, {"bearer": []}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "oneOf": [{"$ref": "#/components/schemas/ActionEvent"},
                              {"type": "array", "minItems": 1, "maxItems": MAX_ACTIONS,
                               "items": {"$ref": "#/components/schemas/ActionEvent"}}]}}}},
                "responses": {
                    "202": _resp("the actions stream has the events", {
                        "type": "object", "required": ["accepted"],
                        "properties": {"accepted": {"type": "integer", "minimum": 1}}}),
                    "400": _resp("invalid JSON or events; nothing was written", {
                        "type": "object", "required": ["error"],
                        "properties": {"error": {"type": "string"}, "invalid": {
                            "type": "array", "items": {
                                "type": "object", "required": ["index", "reason"],
                                "properties": {"index": {"type": "integer", "minimum": 0},
                                               "reason": {"type": "string"}}}}}}),
                    "401": _resp("FRESHREC_API_TOKEN is set and the bearer token is missing or wrong", err),
                    "408": _resp("the body did not all come within FRESHREC_SERVE_READ_TIMEOUT_S", err),
                    "413": _resp(f"body larger than {MAX_BODY_BYTES} bytes", err),
                    "503": _resp("the actions stream is down or failed the write; retry after Retry-After (a write "
                                 "that failed part way may have left some of the actions: the join counts their "
                                 "retry as duplicates)", err, {
                        "Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}),
                },
            }},
            "/healthz": {"get": {
                "operationId": "healthz",
                "responses": {"200": _resp("the server and its serving store", {
                    "type": "object",
                    "required": ["status", "params_version", "freshness_ms", "staleness_ms"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ok", "degraded"]},
                        "params_version": {"type": "integer", "minimum": 0},
                        "dense_version": {"type": "integer", "minimum": 0},
                        "items": {"type": "integer", "minimum": 0},
                        "freshness_ms": {**number, "nullable": True},
                        "staleness_ms": {**number, "nullable": True},
                        "streams": {"type": "object", "additionalProperties": {"type": "string",
                                                                               "enum": ["up", "down"]}},
                    }})},
            }},
            "/metrics": {"get": {
                "operationId": "metrics",
                "responses": {"200": {"description": "Prometheus text format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi",
                "responses": {"200": _resp("this document", {"type": "object"})},
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": _err_schema(),
                "ActionEvent": action,
                "Recommendation": {
                    "type": "object", "required": ["request_id", "user_id", "model_version", "items"],
                    "properties": {
                        "request_id": {"type": "string"},
                        "user_id": {"type": "string"},
                        "model_version": {"type": "string"},
                        "items": {"type": "array", "maxItems": MAX_K, "items": {
                            "type": "object", "required": ["item_id", "score"],
                            "properties": {"item_id": {"type": "string"},
                                           "score": {**number, "nullable": True}}}},
                    },
                },
            },
        },
    }

