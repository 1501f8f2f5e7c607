"""Fixtures shared by every test: the environment, and a real Ray local cluster.

Modules that need Ray share one cluster through `ray_cluster` (module-scoped), started with 2
logical CPUs like the CI machine; `tests.support.service.start_service` then starts the whole
service on it. Helpers (images, waits, the service, load) live in `tests/support/`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    from service.app import serve_environment

    os.environ.pop("RAY_ADDRESS", None)
    serve_environment()  # the Serve front end `visionloop up` runs with
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        from service.cli import stop_service

        stop_service()  # as `visionloop up` stops: Serve, then Ray
