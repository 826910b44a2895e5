"""Reference libraries for parity tests (torch CPU, transformers).

Locally a missing library skips the test; in CI (`JAXLM_REQUIRE_PARITY=1`, set
by `.ci/run`) it fails it, so parity is never silently skipped there.
"""

import importlib
import os

import pytest


def require(module: str):
    if os.environ.get("JAXLM_REQUIRE_PARITY") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)
