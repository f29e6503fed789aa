"""What the modules that setup.py compiles with Cython share: the check that a compiled module was
built from the source beside it (setup.py writes the source's sha256 into the compiled copy)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional


def check_built_from(module_file: str, source_name: str, built_from: Optional[str]) -> None:
    """A compiled module built from another version of its source must not run in its place."""
    source = Path(module_file).with_name(source_name)
    if source.exists() and hashlib.sha256(source.read_bytes()).hexdigest() != built_from:
        raise ImportError(
            f"{module_file} was compiled from another version of {source}: rebuild it "
            f"(`pip install -e .`, or `python setup.py build_ext --inplace`) or delete it to run the source")
