"""The API without Serve: `create_api` over the real stores on a temporary volume, a real
`Classifier` with version 0 (efficientnet_lite0) in this process, a real `TrainingController`,
driven through FastAPI's `TestClient`. What needs Ray (Serve hops, replicas, hot swap, jobs
that train) is tested in tests/service/test_deployments.py and beside it.

`make_api(**settings)` builds one (`client_type=`: another in-process classifier client); the
published v0 is made once per session and copied, so each test module gets its own volume
cheaply.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.clients import InProcessClassifier
from service.app import prepare_home
from service.controller import TrainingController
from service.settings import Settings, load_settings
from tests.support.dataset import dataset_images
from tests.support.service import BACKBONE, in_process_app


@dataclass
class Api:
    """A TestClient over the real app, its volume, token and settings."""

    client: TestClient
    home: Path
    token: str
    settings: Settings
    controller: TrainingController

    def headers(self, token: str | None = "api") -> dict[str, str]:
        if token is None:
            return {}
        return {"Authorization": f"Bearer {self.token if token == 'api' else token}"}


MakeApi = Callable[..., Api]


@pytest.fixture(scope="session")
def v0_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume with version 0 published (once per session; copied by `make_api`)."""
    home = tmp_path_factory.mktemp("v0-volume")
    prepare_home(load_settings(home=home, backbone=BACKBONE))
    return home


@pytest.fixture(scope="module")
def make_api(v0_volume: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[MakeApi]:
    made: list[Api] = []

    def make(client_type: type[InProcessClassifier] = InProcessClassifier,
             **overrides: Any) -> Api:
        """`overrides`: Settings fields; `client_type`: the classifier client (a subclass that
        counts or holds calls)."""
        home = tmp_path_factory.mktemp("api-home")
        shutil.copytree(v0_volume / "models", home / "models")
        made_app = in_process_app(home, client_type, **overrides)
        settings = made_app.settings
        api = Api(TestClient(made_app.app, raise_server_exceptions=False), settings.home,
                  made_app.token, settings, made_app.controller)
        made.append(api)
        return api

    yield make
    for api in made:
        api.client.close()
        api.controller.stop()


def dataset_files(home: Path) -> set[str]:
    """Stored images under dataset/ (ledger, lock, temp and snapshot folders excluded)."""
    return set(dataset_images(home))


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (name, data)) for name, data in items]

