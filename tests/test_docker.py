"""docker/ cannot run on the team's machines (no engine, no compose plugin): what can be checked
without them is checked here. The compose file's ports, mounts and scrape targets, and the Grafana
dashboard's panels: each metric they query is one the code defines, and no panel covers another.
"""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def defined_metrics() -> set[str]:
    names = set()
    for folder in ("flows", "model", "paramserver"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r'"(freshrec_[a-z0-9_]+)"', path.read_text()))
    return names


def base(name: str) -> str:
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def test_every_grafana_panel_queries_metrics_the_code_defines_and_none_overlaps():
    board = json.loads((DOCKER / "grafana" / "dashboards" / "freshrec.json").read_text())
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    known = defined_metrics()
    for p in panels:
        for t in p["targets"]:
            for name in re.findall(r"freshrec_[a-z0-9_]+", t["expr"]):
                assert base(name) in known, (p["title"], name)
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells.get((x, y)))
                cells[(x, y)] = p["title"]
    queried = " ".join(t["expr"] for p in panels for t in p["targets"])
    for name in ("freshrec_serve_requests_total", "freshrec_serve_request_latency_seconds_bucket",
                 "freshrec_serve_index_items", "freshrec_serve_params_version", "freshrec_sync_freshness_seconds"):
        assert name in queried, name


def test_the_compose_stack_publishes_on_loopback_and_prometheus_scrapes_the_flow_and_the_model_server():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "flow", "server", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), (name, volume)
    assert services["server"]["command"][:1] == ["serve"]
    prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {"flow:9464", "server:8000"} <= targets
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/freshrec.json"


def test_the_image_compiles_the_join_modules_in_a_build_stage_and_refuses_them_uncompiled():
    """setup.py compiles some modules with Cython; an image that lacked setup.py or a C compiler
    once ran them as plain Python, silently. The build stage must copy every file the build reads
    and have a compiler; the image must check that each module setup.py names went in compiled."""
    import tomllib

    text = (DOCKER / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2, "a build stage and the image"
    build, image = stages
    assert re.search(r"apt-get install[^\n]*\bgcc\b", build), "the build stage needs a C compiler"
    copied = {src for line in re.findall(r"^COPY (?!--from)(.+)$", build, flags=re.M) for src in line.split()[:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "setup.py", project["project"]["readme"], *project["tool"]["setuptools"]["packages"]}
    assert needed <= copied, needed - copied
    assert "COPY --from=build" in image and "gcc" not in image
    compiled = re.search(r"for module in \(([^)]*)\)", (ROOT / "setup.py").read_text())
    assert compiled
    for module in re.findall(r'"([\w.]+)"', compiled.group(1)):
        alias = re.search(rf"import [^\n]*\b{re.escape(module)} as (\w+)", image)
        assert alias, f"the image does not check that {module} is compiled"
        assert f"{alias.group(1)}.COMPILED" in image, module
