"""Shared fixtures for the end-to-end tests (harness in tests/harness/)."""
from __future__ import annotations

import os
import sys

import pytest

# The harness is imported as a top-level package whether or not tests/ is a package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness.origin import Origin  # noqa: E402
from harness.proxy import ProxyProcess  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end test (1 GiB transfers, reload under load); "
                                       "runs by default, deselect with -m 'not slow'")


@pytest.fixture
def origin():
    with Origin("origin") as o:
        yield o


@pytest.fixture
def make_origin():
    """Factory for extra origins: make_origin(name, close_after_response=False)."""
    made = []

    def make(name="origin", **kw):
        o = Origin(name, **kw).start()
        made.append(o)
        return o
    yield make
    for o in made:
        o.stop()


@pytest.fixture
def make_proxy(tmp_path):
    """Factory: make_proxy(config_dict, start=True) -> a running ProxyProcess, stopped
    (QUIT, TERM, KILL, then a leftover-process check) at teardown."""
    made = []

    def make(config=None, start=True, name="fastproxy"):
        p = ProxyProcess(tmp_path / f"{name}{len(made)}", config, name=name)
        made.append(p)
        if start:
            p.start()
        return p
    yield make
    errors = []
    for p in made:
        try:
            p.stop()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


@pytest.fixture(scope="module")
def module_proxy_factory(tmp_path_factory):
    """Like make_proxy but shared by every test of a module (one proxy start per module)."""
    made = []

    def make(config=None, name="fastproxy"):
        p = ProxyProcess(tmp_path_factory.mktemp(name), config, name=name)
        made.append(p)
        return p.start()
    yield make
    errors = []
    for p in made:
        try:
            p.stop()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


@pytest.fixture(scope="module")
def origin_b():
    """A second origin shared by every test of a module (routes that must tell two apart)."""
    with Origin("origin-b") as o:
        yield o


@pytest.fixture(scope="module")
def module_origin():
    """An echoing origin shared by every test of a module."""
    with Origin("module-origin") as o:
        yield o


@pytest.fixture(scope="module")
def stale_origin():
    """Closes every upstream connection right after answering, without announcing it (a
    pooled connection to it turns out closed on reuse)."""
    with Origin("stale", close_after_response=True) as o:
        yield o
