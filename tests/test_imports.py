"""Imports made inside functions run only when their test does: a name removed from a module can
go unnoticed until that one test runs (a Kafka test under CI, say). Every `from X import n` of the
project's own modules, wherever it is written, must name something X has."""

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "model", "paramserver", "tests", "bench")


def own_imports():
    for path in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and node.module.split(".")[0] in PACKAGES):
                for alias in node.names:
                    yield f"{path.relative_to(ROOT)}:{node.lineno}", node.module, alias.name


def test_every_from_import_of_our_own_modules_names_something_that_is_there():
    missing = []
    for where, module, name in own_imports():
        mod = importlib.import_module(module)
        if name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{where}: from {module} import {name}")
    assert not missing, "\n".join(missing)


def test_the_check_sees_imports_inside_functions():
    found = {(m, n) for w, m, n in own_imports() if w.startswith("tests/model/test_server.py")}
    assert ("tests.kafka_support", "read_topic") in found
