"""Each flow process serves its own Prometheus metrics and the dataflow's graph on 127.0.0.1.

`FRESHREC_METRICS_PORT` plus the process's Bytewax process id (`-i`): one port per process, so a
cluster's processes on one host never collide and the dashboard merges them. The server is a
daemon thread of the standard library's HTTP server; it costs nothing between scrapes. Each scrape
renders the registry afresh (about 1 ms, `dashboard.scrape_ms`): a body cached for a scrape
interval would hand a faster scraper the same counters twice, and its rates would read 0 then
double.

- `GET /metrics`: Prometheus text format (every collector in this process).
- `GET /graph`: the dataflow's graph from `bytewax.visualize`, as JSON nodes and edges, plus
  Bytewax's own mermaid text.
- `GET /info`: the process id, pid and start time.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

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


class MetricsServer:
    """/metrics, /graph and /info of this process on `host:port`, in a daemon thread."""

    def __init__(self, port: int, graph: Optional[dict] = None, process: int = 0, host: str = HOST):
        self.graph = graph or {"nodes": [], "edges": []}
        self.info = {"process": process, "pid": os.getpid(), "started": time.time()}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype = generate_latest(REGISTRY), CONTENT_TYPE_LATEST
                elif path == "/graph":
                    body, ctype = json.dumps(server.graph).encode(), "application/json"
                elif path in ("/info", "/"):
                    body, ctype = json.dumps(server.info).encode(), "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass  # a scrape a second is not news

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="freshrec-metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


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
