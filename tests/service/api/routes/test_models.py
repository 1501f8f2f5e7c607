"""/v1/models: list, manifest, weights, plots, activate (and a version that cannot load is
refused with CURRENT and the policy left as they were), and the promotion policy."""

from __future__ import annotations

import asyncio
import shutil
import threading
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from service.api.clients import InProcessClassifier
from tests.service.api.conftest import Api, MakeApi
from tests.support.http import assert_error
from training.registry import Registry


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    return make_api()


def test_models_endpoints(api: Api) -> None:
    c, auth = api.client, api.headers()
    models = c.get("/v1/models", headers=auth).json()
    assert models["current"] == "v0"
    [v0] = models["versions"]
    assert v0 == {"version": "v0", "created_at": v0["created_at"],
                  "backbone": "efficientnet_lite0", "class_count": 1000, "val_accuracy": None,
                  "test_accuracy": None, "promoted": True}  # the list has no class lists
    assert models["policy"] == {"mode": "automatic", "version": None, "changed_at": None,
                                "by": None}
    assert c.get("/v1/models/v0", headers=auth).json()["classes"][:2] == ["tench", "goldfish"]
    weights = c.get("/v1/models/v0/weights", headers=auth)
    assert weights.status_code == 200 and len(weights.content) > 1_000_000
    for path in ("/v1/models/v99", "/v1/models/bogus", "/v1/models/v99/weights",
                 "/v1/models/v0/plots/curves.png", "/v1/models/v0/plots/..%2Fmanifest.png"):
        assert_error(c.get(path, headers=auth), 404)
    assert_error(c.post("/v1/models/v99/activate", headers=auth), 404, "version_not_found")
    assert_error(c.post("/v1/models/..%2F..%2Fsecrets/activate", headers=auth), 404)


def test_the_list_shows_counts_and_test_accuracy(make_api: MakeApi) -> None:
    api = make_api()
    models = api.home / "models"
    shutil.copytree(models / "v0", models / "v1")
    Registry(api.home).update_manifest("v1", classes=["blue", "red"], metrics={
        "best_val_accuracy": 0.75, "test": {"accuracy": 0.625, "count": 8}})
    listed = api.client.get("/v1/models", headers=api.headers()).json()["versions"]
    assert [(v["version"], v["class_count"], v["val_accuracy"], v["test_accuracy"])
            for v in listed] == [("v0", 1000, None, None), ("v1", 2, 0.75, 0.625)]
    full = api.client.get("/v1/models/v1", headers=api.headers()).json()
    assert full["classes"] == ["blue", "red"] and full["metrics"]["test"]["accuracy"] == 0.625


def test_activate_pins_unless_asked_not_to(api: Api) -> None:
    c, auth = api.client, api.headers()
    r = c.post("/v1/models/v0/activate", headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["current"] == "v0" and body["replicas"] == ["v0"]
    assert body["policy"]["mode"] == "pinned" and body["policy"]["version"] == "v0"
    assert body["policy"]["by"] == "api" and body["policy"]["changed_at"] > 0
    assert c.get("/v1/models", headers=auth).json()["policy"] == body["policy"]
    assert c.get("/v1/models/policy", headers=auth).json() == body["policy"]
    r = c.post("/v1/models/v0/activate", params={"pin": "false"}, headers=auth)
    assert r.status_code == 200 and r.json()["policy"]["mode"] == "automatic"
    assert r.json()["policy"]["version"] is None
    assert_error(c.post("/v1/models/v0/activate", params={"pin": "sometimes"}, headers=auth),
                 400, "bad_request")
    assert_error(c.post("/v1/models/v0/activate"), 401)


def test_policy_put(api: Api) -> None:
    c, auth = api.client, api.headers()
    r = c.put("/v1/models/policy", json={"mode": "pinned"}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "pinned" and r.json()["version"] == "v0"
    assert r.json()["by"] == "api"
    assert c.get("/v1/models", headers=auth).json()["policy"] == r.json()
    for bad in ({"mode": "manual"}, {"mode": "pinned", "version": "v1"}, {}, {"mode": None}):
        assert_error(c.put("/v1/models/policy", json=bad, headers=auth), 400, "bad_request")
    assert_error(c.put("/v1/models/policy", content=b"{nope",
                       headers={**auth, "content-type": "application/json"}), 400)
    assert_error(c.put("/v1/models/policy", json={"mode": "automatic"}), 401)
    assert c.get("/v1/models/policy", headers=auth).json() == r.json()  # refusals changed nothing
    r = c.put("/v1/models/policy", json={"mode": "automatic"}, headers=auth)
    assert r.status_code == 200 and r.json()["mode"] == "automatic"
    assert r.json()["version"] is None
    current = api.home / "models" / "CURRENT"
    current.unlink()  # nothing current: nothing to pin
    try:
        assert_error(c.put("/v1/models/policy", json={"mode": "pinned"}, headers=auth), 409,
                     "no_current_version")
    finally:
        current.write_text("v0\n")


class HeldReload(InProcessClassifier):
    """The real in-process classifier client whose `reload_all` first waits for `release`:
    the window in which another writer of CURRENT can act during an activate."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.waiting, self.release = threading.Event(), threading.Event()

    async def reload_all(self) -> list[dict[str, Any]]:
        self.waiting.set()
        await asyncio.to_thread(self.release.wait, 60)
        return await super().reload_all()


def test_an_activate_overtaken_by_another_stands_aside(make_api: MakeApi) -> None:
    """While the replicas load v1, another process (the CLI) activates v0: the later choice
    stands (CURRENT v0, pinned by it), and the first activate answers 409 saying so."""
    api = make_api(client_type=HeldReload)
    models = api.home / "models"
    shutil.copytree(models / "v0", models / "v1")
    held: HeldReload = api.client.app.state.services.classifier  # type: ignore[attr-defined]
    answers: list[httpx.Response] = []
    first = threading.Thread(target=lambda: answers.append(
        api.client.post("/v1/models/v1/activate", headers=api.headers())))
    first.start()
    try:
        assert held.waiting.wait(60)
        assert Registry(api.home).current() == "v1"
        Registry(api.home).activate("v0", pin=True, by="cli")
    finally:
        held.release.set()
        first.join()
    body = assert_error(answers[0], 409, "activation_superseded")
    assert body["error"]["message"].startswith("CURRENT changed to v0 while v1 was loading")
    assert Registry(api.home).current() == "v0"
    assert Registry(api.home).policy()["by"] == "cli"
    assert api.client.get("/readyz").json()["model_versions"] == ["v0"]


def test_activate_a_version_that_cannot_load(api: Api) -> None:
    """A copy of v0 with its weights bit-flipped: the checksum refuses it, CURRENT stays v0
    and the policy stays what it was (the failed activate's pin is undone too)."""
    c, auth = api.client, api.headers()
    policy = c.put("/v1/models/policy", json={"mode": "automatic"}, headers=auth).json()
    models = api.home / "models"
    shutil.copytree(models / "v0", models / "v1")
    weights = models / "v1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    body = assert_error(c.post("/v1/models/v1/activate", headers=auth), 500, "model_load_failed")
    assert "CURRENT stays v0" in body["error"]["message"]
    assert (models / "CURRENT").read_text().strip() == "v0"
    assert c.get("/v1/models/policy", headers=auth).json() == policy
    ready = c.get("/readyz").json()
    assert ready["model_versions"] == ["v0"]


def test_a_version_whose_weights_file_is_gone(make_api: MakeApi) -> None:
    """A real published version with its weights file removed from the volume: download and
    activate are 409 naming it (activate before CURRENT is touched), its manifest and the list
    still answer, and the served model is untouched."""
    api = make_api()
    c, auth = api.client, api.headers()
    models = api.home / "models"
    shutil.copytree(models / "v0", models / "v1")
    (models / "v1" / "model.safetensors").unlink()
    for r in (c.get("/v1/models/v1/weights", headers=auth),
              c.post("/v1/models/v1/activate", headers=auth)):
        body = assert_error(r, 409, "invalid_version")
        assert body["error"]["message"].startswith("v1 is broken: its weights file "
                                                   "model.safetensors is missing")
    assert (models / "CURRENT").read_text().strip() == "v0"
    assert c.get("/v1/models/policy", headers=auth).json()["mode"] == "automatic"
    assert c.get("/v1/models/v1", headers=auth).json()["version"] == "v0"  # the copied manifest
    assert [v["version"] for v in c.get("/v1/models", headers=auth).json()["versions"]] == [
        "v0", "v1"]
    (models / "v1" / "model.safetensors").mkdir()  # not a file either
    assert_error(c.get("/v1/models/v1/weights", headers=auth), 409, "invalid_version")
    assert c.get("/readyz").json()["model_versions"] == ["v0"]
    assert c.get("/v1/models/v0/weights", headers=auth).status_code == 200


@pytest.mark.parametrize("version", ["v" + "9" * 5000, "v0\x00", "..", "v\u0661"])
def test_version_names_that_cannot_exist_are_404(api: Api, version: str) -> None:
    c, auth = api.client, api.headers()
    for method, path in (("GET", "{}"), ("GET", "{}/weights"), ("POST", "{}/activate"),
                         ("GET", "{}/plots/curves.png")):
        r = c.request(method, "/v1/models/" + path.format(quote(version, safe="")),
                      headers=auth)
        assert len(assert_error(r, 404)["error"]["message"]) < 200
