"""HE backend tests need tenseal (Microsoft SEAL); without it every test here is skipped."""

import importlib.util

import pytest

HAVE_TENSEAL = importlib.util.find_spec("tenseal") is not None


@pytest.fixture(autouse=True)
def _needs_tenseal():
    if not HAVE_TENSEAL:
        pytest.skip("tenseal is not installed: the HE backend (BFV over SEAL) cannot run; pip install tenseal")
