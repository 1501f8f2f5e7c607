"""/v1/models: list, manifest, weights, plots, activate (and a version that cannot load is
refused with CURRENT left as it was)."""

from __future__ import annotations

import shutil
from urllib.parse import quote

import pytest

from tests.service.api.conftest import Api, MakeApi
from tests.support.http import assert_error


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    return make_api()


def test_models_endpoints(api: Api) -> None:
    c, auth = api.client, api.headers()
    models = c.get("/v1/models", headers=auth).json()
    assert models["current"] == "v0"
    [v0] = models["versions"]
    assert v0["version"] == "v0" and v0["backbone"] == "efficientnet_lite0"
    assert len(v0["classes"]) == 1000 and v0["promoted"] is True
    assert c.get("/v1/models/v0", headers=auth).json()["classes"][:2] == ["tench", "goldfish"]
    weights = c.get("/v1/models/v0/weights", headers=auth)
    assert weights.status_code == 200 and len(weights.content) > 1_000_000
    for path in ("/v1/models/v99", "/v1/models/bogus", "/v1/models/v99/weights",
                 "/v1/models/v0/plots/curves.png", "/v1/models/v0/plots/..%2Fmanifest.png"):
        assert_error(c.get(path, headers=auth), 404)
    assert_error(c.post("/v1/models/v99/activate", headers=auth), 404, "version_not_found")
    assert_error(c.post("/v1/models/..%2F..%2Fsecrets/activate", headers=auth), 404)


def test_activate(api: Api) -> None:
    c, auth = api.client, api.headers()
    r = c.post("/v1/models/v0/activate", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == {"current": "v0", "replicas": ["v0"]}


def test_activate_a_version_that_cannot_load(api: Api) -> None:
    """A copy of v0 with its weights bit-flipped: the checksum refuses it, CURRENT stays v0."""
    c, auth = api.client, api.headers()
    models = api.home / "models"
    shutil.copytree(models / "v0", models / "v1")
    weights = models / "v1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    body = assert_error(c.post("/v1/models/v1/activate", headers=auth), 500, "model_load_failed")
    assert "CURRENT stays v0" in body["error"]["message"]
    assert (models / "CURRENT").read_text().strip() == "v0"
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
