"""Builds the join's hot loop (flows/joiner.py) with Cython; everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import setup

setup(
    ext_modules=cythonize(
        ["flows/joiner.py"],
        compiler_directives={"language_level": 3},
        quiet=True,
    ),
)
