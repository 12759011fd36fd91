"""The opt-in compiled build: `EDGED_COMPILE=1 pip install .` compiles the call path with mypyc.

Everything else about the package is in pyproject.toml; without EDGED_COMPILE this adds nothing and the
install is pure Python. The modules compiled are listed in edged/buildinfo.py (`COMPILED`); mypy comes into
pip's build environment through build_backend/edged_build.py (the `compile` extra, pinned).

A failed compiled build fails the install (nothing is installed): scripts/install.sh --compiled then installs
the pure build and says why.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "build_backend"))
import edged_build  # noqa: E402

# The compiled build's own build folder: a later pure build (setuptools' default build/) never packs its .so files.
COMPILED_BUILD = "build/compiled"
# Only the compiled modules must be mypy-clean: the modules they import are read for their types, but their own
# type errors are not this build's to fix (they run interpreted either way). Installed packages are not looked
# at (their types are Any): the build is the same whatever the box has installed, and compiled code does not
# check values against another package's annotations.
MYPY_OPTIONS = ["--follow-imports=silent", "--no-site-packages", "--ignore-missing-imports"]
# mypyc names the C field of an attribute `_unix` `__unix`, which is one of GCC's predefined macros on Unix.
EXTRA_CFLAGS = ["-U__unix"]


def compiled_extensions() -> list:
    """mypyc's extension modules for edged/buildinfo.py's list, in one group (one shared library, `edged__mypyc`,
    and a small stub per module); none unless EDGED_COMPILE asks for them."""
    if not edged_build.compile_requested() or edged_build.metadata_only:
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.exit("EDGED_COMPILE is set but mypy (mypyc) is not installed: pip install '.[compile]' first")
    modules = runpy.run_path(str(HERE / "edged" / "buildinfo.py"))["COMPILED"]
    os.chdir(HERE)  # mypyc names modules from the paths, relative to the top of the tree
    extensions = mypycify(
        [*MYPY_OPTIONS, *modules], opt_level="3", debug_level="0", group_name="edged", target_dir=COMPILED_BUILD
    )
    for ext in extensions:
        ext.extra_compile_args = [*(ext.extra_compile_args or []), *EXTRA_CFLAGS]
    return extensions


extensions = compiled_extensions()
setup(ext_modules=extensions, options={"build": {"build_base": COMPILED_BUILD}} if extensions else {})
