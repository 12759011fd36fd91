"""edged's build backend: setuptools', plus mypy in the build environment when the compiled build is asked for.

`EDGED_COMPILE=1 pip install .` compiles the call path with mypyc (setup.py), and pip's isolated build
environment then needs mypy: this adds the `compile` extra's pinned requirement to the build requirements. A
plain `pip install .` is exactly setuptools' build (nothing is added, nothing is compiled).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (every hook not redefined below is setuptools' own)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (Python 3.10: pyproject.toml's build-system requires tomli there)
    import tomli as tomllib

TRUE = ("1", "yes", "true", "on")
# True while setuptools runs setup.py only for the build requirements (mypy is not installed yet then) or the
# metadata (which compiling would only slow down): setup.py then compiles nothing.
metadata_only = False


def compile_requested() -> bool:
    """EDGED_COMPILE is set to a true value."""
    return os.environ.get("EDGED_COMPILE", "").strip().lower() in TRUE


def compile_requires() -> list[str]:
    """The `compile` extra of pyproject.toml (mypy, pinned): the one place its version is written."""
    with (Path(__file__).resolve().parents[1] / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["optional-dependencies"]["compile"])


def _metadata_only(setuptools_hook, *args):
    """`setuptools_hook(*args)` with setup.py told not to compile."""
    global metadata_only
    metadata_only = True
    try:
        return setuptools_hook(*args)
    finally:
        metadata_only = False


def _requires(setuptools_hook, config_settings) -> list[str]:
    found = _metadata_only(setuptools_hook, config_settings)
    return [*found, *(compile_requires() if compile_requested() else [])]


def get_requires_for_build_wheel(config_settings=None) -> list[str]:
    return _requires(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None) -> list[str]:
    return _requires(_setuptools.get_requires_for_build_editable, config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None) -> str:
    return _metadata_only(_setuptools.prepare_metadata_for_build_wheel, metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None) -> str:
    return _metadata_only(_setuptools.prepare_metadata_for_build_editable, metadata_directory, config_settings)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None) -> str:
    """setuptools' editable build; refused with EDGED_COMPILE set: it would compile in place, and the .so files
    in the tree would shadow the .py sources being edited (scripts/build-compiled builds a separate venv)."""
    if compile_requested():
        raise RuntimeError(
            "EDGED_COMPILE=1 cannot make an editable install: use scripts/build-compiled (or a non-editable install)"
        )
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
