"""Each flow process serves its own Prometheus metrics and the dataflow's graph on 127.0.0.1.

`FRESHREC_METRICS_PORT` plus the process's Bytewax process id (`-i`): one port per process, so a
cluster's processes on one host never collide and the dashboard merges them. The server's
threads wait in `accept` and `recv` and run nothing between scrapes (see `MetricsServer` for what a
scrape costs the flow, and why). Each scrape renders the registry afresh (about 1 ms of CPU,
`dashboard.scrape_ms`): a body cached for a scrape interval would hand a faster scraper the same
counters twice, and its rates would read 0 then double.

- `GET /metrics`: Prometheus text format (every collector in this process).
- `GET /graph`: the dataflow's graph from `bytewax.visualize`, as JSON nodes and edges, plus
  Bytewax's own mermaid text.
- `GET /info`: the process id, pid and start time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("freshrec.observe")

HOST = "127.0.0.1"


def process_id(argv: Optional[list[str]] = None, env: Optional[dict] = None) -> int:
    """This process's Bytewax process id: `-i`/`--process-id`, else Bytewax's own variables, else 0.

    `bytewax.run` imports the flow after parsing its flags but leaves them in `sys.argv`.
    """
    argv = sys.argv if argv is None else argv
    env = os.environ if env is None else env
    for i, a in enumerate(argv):
        if a in ("-i", "--process-id") and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--process-id="):
            return int(a.split("=", 1)[1])
        if a.startswith("-i") and a[2:].isdigit():
            return int(a[2:])
    if env.get("BYTEWAX_PROCESS_ID", "").strip().isdigit():
        return int(env["BYTEWAX_PROCESS_ID"])
    pod, sts = env.get("BYTEWAX_POD_NAME"), env.get("BYTEWAX_STATEFULSET_NAME")
    if pod and sts and pod.startswith(sts + "-") and pod[len(sts) + 1:].isdigit():
        return int(pod[len(sts) + 1:])
    return 0


def workers_per_process(argv: Optional[list[str]] = None) -> int:
    """Bytewax's `-w`/`--workers-per-process`, else 1."""
    argv = sys.argv if argv is None else argv
    for i, a in enumerate(argv):
        if a in ("-w", "--workers-per-process") and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if a.startswith("--workers-per-process=") and a.split("=", 1)[1].isdigit():
            return int(a.split("=", 1)[1])
        if a.startswith("-w") and a[2:].isdigit():
            return int(a[2:])
    return 1


def worker_label() -> str:
    """The calling Bytewax worker's index in the whole cluster, as Bytewax counts it (`worker_index`).

    Bytewax tells a stateful step nothing of its worker, and its threads are not Python's (their
    Python name is `Dummy-N`, different in every process). Timely names each worker thread
    `timely:work-<index in its process>` at the OS level; with the process id and the workers per
    process, that is Bytewax's global index. A single worker runs in the calling thread (`-w 1`,
    `run_main`): it is the process's first.
    """
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            name = f.read().strip()
    except OSError:
        name = ""
    local = int(name[12:]) if name.startswith("timely:work-") and name[12:].isdigit() else 0
    return str(process_id() * workers_per_process() + local)


def graph_of(flow: Any) -> dict:
    """The top-level steps of a dataflow and the streams between them, from `bytewax.visualize`."""
    from bytewax.visualize import to_mermaid, to_rendered

    rendered = to_rendered(flow)
    owner: dict[str, str] = {}
    for step in rendered.substeps:
        for port in step.out_ports:
            owner[port.port_id] = step.step_name
    nodes = [{"id": s.step_name, "op": s.op_type} for s in rendered.substeps]
    edges = []
    for step in rendered.substeps:
        for port in step.inp_ports:
            for src in port.from_port_ids:
                if src in owner:
                    edges.append({"from": owner[src], "to": step.step_name, "port": port.port_name})
    return {"flow_id": rendered.flow_id, "nodes": nodes, "edges": edges, "mermaid": to_mermaid(flow)}


class ProcessFigures(Collector):
    """The standard `process_*` figures (the names and meanings of prometheus_client's
    `ProcessCollector`), read with few system calls: a scrape runs in a thread of the flow's
    process, and each blocking call there (prometheus_client opens, reads and closes three files
    and lists /proc/self/fd, 21 calls a scrape) lets go of the GIL and takes it back, so the flow's
    thread may have to wait for it. `/proc/self/stat` stays open and is read with one `pread`; the
    open descriptors (a GIL release per descriptor to count them) are counted at most every
    OPEN_FDS_EVERY_S; the limit comes from `getrlimit`, which keeps the GIL.
    """

    OPEN_FDS_EVERY_S = 15.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._pid = 0
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = resource.getpagesize()
        self._boot = self._boot_time()
        self._open_fds: Optional[tuple[float, int]] = None

    @staticmethod
    def _boot_time() -> float:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
        raise OSError("no btime in /proc/stat")

    def _stat(self) -> list[bytes]:
        if self._fd is None or self._pid != os.getpid():  # a forked child reads its own
            self._fd, self._pid = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC), os.getpid()
        return os.pread(self._fd, 4096, 0).rsplit(b")", 1)[1].split()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            try:
                parts = self._stat()
            except OSError:
                return
            now = time.monotonic()
            if self._open_fds is None or now - self._open_fds[0] >= self.OPEN_FDS_EVERY_S:
                self._open_fds = (now, len(os.listdir("/proc/self/fd")))
            open_fds = self._open_fds[1]
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", value=float(parts[20]))
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                                value=float(parts[21]) * self._page)
        yield GaugeMetricFamily("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                                value=float(parts[19]) / self._ticks + self._boot)
        yield CounterMetricFamily("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                                  value=(float(parts[11]) + float(parts[12])) / self._ticks)
        yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", value=open_fds)
        yield GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.",
                                value=float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))


_FIGURES_LOCK = threading.Lock()


def use_process_figures(registry: CollectorRegistry = REGISTRY) -> None:
    """Serve `ProcessFigures` in place of prometheus_client's default `ProcessCollector` (once)."""
    with _FIGURES_LOCK:
        collectors = list(registry._collector_to_names)  # noqa: SLF001 (no public listing)
        if any(isinstance(c, ProcessFigures) for c in collectors):
            return
        try:
            figures = ProcessFigures()
        except OSError:
            return  # no /proc: keep whatever the registry has
        for c in collectors:
            if isinstance(c, ProcessCollector):
                registry.unregister(c)
        registry.register(figures)


MAX_CONNECTIONS = 16  # scrapers at once; more are turned away
IDLE_S = 60.0  # a kept-alive connection with no request for this long is closed
MAX_HEAD = 8192  # bytes of request line and headers
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


class MetricsServer:
    """/metrics, /graph and /info of this process on `host:port`, in daemon threads.

    Its threads share the flow's process: its GIL and, on Linux with autogroup, its session's CPU
    share, so every millisecond a scrape takes is the flow's. A scrape here is as little work as
    can be: nothing runs between scrapes (the acceptor blocks in `accept`, no polling), a scraper's
    connection is kept alive (HTTP/1.1) in a thread of its own, a request is one read, the registry
    rendered afresh, one write, and the `process_*` figures take one `pread` (`ProcessFigures`).
    Measured at 20 scrapes/s (to make it visible) on the loaded 2-core machine, the flow's
    throughput over none: the standard library's `ThreadingHTTPServer` with prometheus_client's
    `ProcessCollector` 0.83-0.85, this server 0.88-0.90 (medians of 8-10 interleaved runs, noisy).
    GET and HEAD only, no request bodies.
    """

    def __init__(self, port: int, graph: Optional[dict] = None, process: int = 0, host: str = HOST):
        self.graph = graph or {"nodes": [], "edges": []}
        self.info = {"process": process, "pid": os.getpid(), "started": time.time()}
        use_process_figures()
        self._sock = socket.create_server((host, port), backlog=MAX_CONNECTIONS)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self.port = self.address[1]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        self.thread = threading.Thread(target=self._accept, name="freshrec-metrics", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed or len(self._conns) >= MAX_CONNECTIONS:
                    conn.close()
                    if self._closed:
                        return
                    continue
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="freshrec-metrics-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(IDLE_S)
        buf = b""
        try:
            while True:
                while (end := buf.find(b"\r\n\r\n")) < 0:
                    if len(buf) > MAX_HEAD:
                        conn.sendall(_response(400, b"request head too large\n", "text/plain", keep=False))
                        return
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf[:end], buf[end + 4:]
                response, keep = self.respond(head)
                conn.sendall(response)
                if not keep:
                    return
        except OSError:
            return  # the scraper went away, or stayed idle too long
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def respond(self, head: bytes) -> tuple[bytes, bool]:
        """The whole response to one request head (request line and headers), and whether the
        connection stays open after it."""
        lines = head.split(b"\r\n")
        request = lines[0].split()
        if len(request) != 3 or request[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            return _response(400, b"expected: GET <path> HTTP/1.1\n", "text/plain", keep=False), False
        method, target, version = request
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                return _response(400, b"malformed header line\n", "text/plain", keep=False), False
            headers[name.strip().lower()] = value.strip().lower()
        connection = headers.get(b"connection", b"")
        keep = b"close" not in connection if version == b"HTTP/1.1" else b"keep-alive" in connection
        if headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
            return _response(400, b"no request bodies here\n", "text/plain", keep=False), False
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"GET or HEAD\n", "text/plain", keep, [("Allow", "GET, HEAD")]), keep
        path = target.split(b"?", 1)[0]
        try:
            if path == b"/metrics":
                body, ctype = generate_latest(REGISTRY), CONTENT_TYPE_LATEST
            elif path == b"/graph":
                body, ctype = json.dumps(self.graph).encode(), "application/json"
            elif path in (b"/info", b"/"):
                body, ctype = json.dumps(self.info).encode(), "application/json"
            else:
                return _response(404, b"not found: /metrics, /graph, /info\n", "text/plain", keep), keep
        except Exception:  # a collector that fails is the server's fault, not the scraper's
            log.exception("rendering %s failed", path.decode(errors="replace"))
            return _response(500, b"rendering failed (see the flow's log)\n", "text/plain", keep), keep
        return _response(200, body, ctype, keep, head_only=method == b"HEAD"), keep

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self._sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv; the thread closes it
        self.thread.join(timeout=5)


def _response(status: int, body: bytes, ctype: str, keep: bool, extra: tuple = (), head_only: bool = False) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {ctype}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in extra]
    if not keep:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


_SERVER: Optional[MetricsServer] = None


def serve_metrics(base_port: Optional[int], flow: Any = None, host: str = HOST) -> Optional[MetricsServer]:
    """Start (once per process) the metrics server on `base_port` + this process's id.

    A port already taken is logged, not fatal: the flow matters more than its metrics.
    """
    global _SERVER
    if base_port is None:
        return None
    if _SERVER is not None:
        if flow is not None:
            _SERVER.graph = graph_of(flow)
        return _SERVER
    pid = process_id()
    port = base_port + pid
    try:
        _SERVER = MetricsServer(port, graph_of(flow) if flow is not None else None, pid, host)
    except OSError as e:
        log.warning("FRESHREC_METRICS_PORT: cannot serve metrics on %s:%d (%s); the flow runs without them",
                    host, port, e.strerror)
        return None
    log.info("metrics of process %d on http://%s:%d/metrics (graph at /graph)", pid, host, _SERVER.port)
    return _SERVER
