"""One local Ray runtime for the tests that need one (a pytest plugin, named in ``tests/conftest.py``).

Starting Ray costs seconds of CPU (the GCS, the raylet, their agents, the first workers), so the
tests that need a running Ray ask for the ``ray_runtime`` fixture and share one runtime: it starts
on the first such test and stops after the last of a run of them (when the next test does not ask
for it), so no other test runs beside an idle Ray. ``anomalyclip predict --ray`` run in the test
process joins it (``start_ray`` reuses an initialized Ray).

Those tests come one after the other in the collection (the end of ``test_distributed.py``, then
``test_distributed_serve.py``), so a plain run starts Ray once. Under ``pytest -n N`` (``--dist
load``) each worker gets chunks of consecutive tests: the Ray tests usually land on one worker,
and a worker's share of them runs one after the other, so each worker starts Ray at most once.
They also carry ``pytest.mark.xdist_group("ray")`` for ``--dist loadgroup``, which puts them all
on one worker (not with pytest 9.2 and pytest-xdist 3.8, which lose the groups: pytest-xdist
issue 1386).
"""

from __future__ import annotations

import pytest

RAY_GROUP = pytest.mark.xdist_group("ray")

#: Two CPUs (two actors at a time, whatever the machine) and a small object store: the tests move
#: paths, scores and encoded maps, never large arrays (Ray's default store is 30 % of the memory).
RAY_OPTIONS = dict(
    num_cpus=2,
    object_store_memory=256 * 1024**2,
    include_dashboard=False,
    logging_level="WARNING",
    log_to_driver=False,
)

_started = False  # this plugin started the running Ray (and stops it)


def start_ray():
    """The running local Ray, started with :data:`RAY_OPTIONS` if none runs in this process."""
    global _started
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    if not ray.is_initialized():
        ray.init(address="local", **RAY_OPTIONS)
        _started = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture
def ray_runtime():
    """The shared local Ray (see the module); every test that uses Ray asks for it."""
    return start_ray()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the test's fixtures are torn down first (a Serve deployment with its module)
    global _started
    if _started and (nextitem is None or "ray_runtime" not in nextitem.fixturenames):
        import ray

        ray.shutdown()
        _started = False


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker (with --dist loadgroup)")
