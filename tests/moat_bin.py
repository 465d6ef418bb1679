"""Where the Python tests find the `moat` binary (one place for all suites).

`$MOAT_BIN` wins (scripts/test.sh sets it); otherwise the debug or release
build under `$CARGO_TARGET_DIR` or the repository's `target/`, then `PATH`.
tests/conftest.py puts this folder on `sys.path` for every suite.
"""

import os
import shutil

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moat_binary() -> str:
    explicit = os.environ.get("MOAT_BIN")
    if explicit:
        return explicit
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    for candidate in (os.path.join(target, "debug", "moat"), os.path.join(target, "release", "moat")):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("moat")
    if found:
        return found
    pytest.fail("moat binary not found: set MOAT_BIN or run `cargo build -p moat`")
