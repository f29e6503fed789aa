"""Builds the join's hot loop, flows/joiner.py, the spill store, flows/spill.py, its index,
flows/dueindex.py, and the parser's flows/untrack.py with Cython; everything else is in pyproject.toml.

Cython compiles a copy of the source that records the source's digest (`_BUILT_FROM`), so that
a compiled module refuses to load once its source has changed without a rebuild, instead
of running the old code (an extension module wins over the .py beside it).
"""

import hashlib
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
PLACEHOLDER = "_BUILT_FROM: Optional[str] = None"


def source_with_digest(module: str) -> str:
    src = ROOT / (module.replace(".", "/") + ".py")
    text = src.read_text(encoding="utf-8")
    if text.count(PLACEHOLDER) != 1:
        raise SystemExit(f"setup.py: {src} must hold the line {PLACEHOLDER!r} once")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    copy = ROOT / "build" / "cython" / src.relative_to(ROOT)
    copy.parent.mkdir(parents=True, exist_ok=True)
    for pkg in copy.relative_to(ROOT / "build" / "cython").parents:
        if str(pkg) != ".":
            (ROOT / "build" / "cython" / pkg / "__init__.py").touch()
    text = text.replace(PLACEHOLDER, f'_BUILT_FROM: Optional[str] = "{digest}"')
    if not copy.exists() or copy.read_text(encoding="utf-8") != text:  # unchanged: no recompile
        copy.write_text(text, encoding="utf-8")
    for pxd in src.parent.glob("*.pxd"):  # declarations the copies cimport (flows/_capi.pxd)
        beside = copy.parent / pxd.name
        if not beside.exists() or beside.read_bytes() != pxd.read_bytes():
            beside.write_bytes(pxd.read_bytes())
    return str(copy.relative_to(ROOT))


setup(
    ext_modules=cythonize(
        # optional: where no C compiler is at hand the install goes on and the same source runs as
        # plain Python (slower; each module's `COMPILED` says which, and CI checks they compiled).
        [Extension(module, [source_with_digest(module)], optional=True)
         for module in ("flows.joiner", "flows.dueindex", "flows.spill", "flows.untrack")],
        compiler_directives={"language_level": 3},
        quiet=True,
    ),
)
