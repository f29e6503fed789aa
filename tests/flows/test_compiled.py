"""The modules setup.py compiles with Cython: compiled by the install, refused when stale."""

import importlib
import os

import pytest

from flows.compiled import check_built_from

MODULES = ["flows.joiner", "flows.dueindex", "flows.spill", "flows.untrack"]


@pytest.mark.parametrize("name", MODULES)
def test_a_compiled_module_refuses_to_run_in_place_of_a_changed_source(name):
    module = importlib.import_module(name)
    source = name.rsplit(".", 1)[1] + ".py"
    with pytest.raises(ImportError, match="compiled from another version"):
        check_built_from(module.__file__, source, "0" * 64)


def test_an_unchanged_source_passes(tmp_path):
    import hashlib

    (tmp_path / "m.py").write_text("x = 1\n")
    check_built_from(str(tmp_path / "m.so"), "m.py", hashlib.sha256(b"x = 1\n").hexdigest())


@pytest.mark.skipif(not os.environ.get("CI"), reason="a working tree may run the source uncompiled")
@pytest.mark.parametrize("name", MODULES)
def test_the_install_compiles_it(name):
    module = importlib.import_module(name)
    assert module.COMPILED, f"{module.__file__} is not the compiled module: pip install -e . builds it (setup.py)"
