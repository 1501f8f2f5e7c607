"""Who may call what: the API token on every /v1 endpoint but predict, the predict token on
predict only, and the bearer scheme in the OpenAPI document; and what a route may be called
with: every path parameter of every route, awkward and fuzzed (hypothesis), is a 4xx in the
error shape, never a 500."""

from __future__ import annotations

import re
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service.api.conftest import Api, MakeApi, files
from tests.support.http import assert_error
from tests.support.images import image_bytes

PREDICT_TOKEN = "predict-token-123"

PROTECTED = [
    ("GET", "/v1/models"), ("GET", "/v1/dataset"), ("GET", "/v1/review"), ("GET", "/v1/train"),
    ("POST", "/v1/train"), ("POST", "/v1/labels"), ("POST", "/v1/models/v0/activate"),
    ("DELETE", "/v1/labels/" + "0" * 64), ("GET", "/v1/models/v0/weights"),
    ("GET", "/v1/train/x"), ("DELETE", "/v1/train/x"), ("POST", "/v1/feedback"),
    ("GET", "/v1/models/v0"), ("GET", "/v1/models/v0/plots/curves.png"),
    ("POST", "/v1/review/" + "0" * 32 + "/dismiss"), ("GET", "/v1/review/" + "0" * 32 + "/image"),
]


@pytest.fixture(scope="module")
def api(make_api: MakeApi) -> Api:
    return make_api(predict_token=PREDICT_TOKEN)


@pytest.mark.parametrize("method,path", PROTECTED)
def test_api_token_required(api: Api, method: str, path: str) -> None:
    c = api.client
    r = c.request(method, path)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(c.request(method, path, headers=api.headers("wrong-token-wrong-token")), 401,
                 "unauthorized")
    assert_error(c.request(method, path, headers={"Authorization": f"Basic {api.token}"}), 401,
                 "unauthorized")
    # a valid token without the right
    assert_error(c.request(method, path, headers=api.headers(PREDICT_TOKEN)), 403, "forbidden")


def test_predict_token(api: Api) -> None:
    body = files(("a.png", image_bytes()))
    assert_error(api.client.post("/v1/predict", files=body), 401)
    for token in (PREDICT_TOKEN, "api"):
        r = api.client.post("/v1/predict", files=body, headers=api.headers(token))
        assert r.status_code == 200 and r.headers["x-model-version"] == "v0"


def test_predict_is_open_without_a_predict_token(make_api: MakeApi) -> None:
    open_api = make_api()
    r = open_api.client.post("/v1/predict", files=files(("a.png", image_bytes())))
    assert r.status_code == 200, r.text


def test_openapi_has_a_bearer_scheme(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["APIToken"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]
        ["APIToken"]["description"]}
    assert {"APIToken": []} in doc["paths"]["/v1/models"]["get"]["security"]
    assert {"APIToken": []} in doc["paths"]["/v1/predict"]["post"]["security"]
    assert "security" not in doc["paths"]["/healthz"]["get"]


# -- every path parameter ------------------------------------------------------------------------

# Values a URL can carry that a store must not trip over: NUL and control characters, a name of
# thousands of characters (longer than a filename may be), dot segments, separators once
# decoded, other scripts' digits, and names of files that do live beside the records.
AWKWARD = ["\x00", "a\x00b", "x" * 300, "9" * 5000, "v" + "9" * 5000, "..", ".", "...",
           "a/b", "a\\b", "%00", "%2e%2e", ".lock", "schedule", "schedule.state", "CURRENT",
           "v\u0661", "v0\n", " v0", "vv0", "v-1", "v1e3", "\u202ev0", "\U0001f600", "0" * 64,
           "g" * 64]


def path_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path template) of every route that takes a path parameter, from the app's
    OpenAPI document (so a route added later is covered too)."""
    return sorted((method.upper(), path) for path, item in app.openapi()["paths"].items()
                  if "{" in path for method in item)


def fill(template: str, value: str) -> str:
    quoted = quote(value, safe="")
    return re.sub(r"{[^}]+}", lambda _: quoted, template)


def assert_answered(r: httpx.Response) -> None:
    assert r.status_code < 500, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    if r.status_code >= 400:
        assert_error(r, r.status_code)


def test_every_path_parameter_is_checked(api: Api) -> None:
    """Every route with a path parameter answers awkward values with a 4xx in the error
    shape, never a 500."""
    routes = path_routes(api.client.app)  # type: ignore[arg-type]
    assert ("GET", "/v1/train/{job_id}") in routes and ("DELETE", "/v1/labels/{sha256}") in routes
    for method, template in routes:
        for value in AWKWARD:
            assert_answered(api.client.request(method, fill(template, value),
                                               headers=api.headers()))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), value=st.one_of(
    st.text(max_size=80), st.text(min_size=200, max_size=3000),
    st.text(alphabet="v0123456789.-/\\%\x00 ", max_size=20)))
def test_path_parameters_fuzzed(api: Api, data: st.DataObject, value: str) -> None:
    method, template = data.draw(st.sampled_from(path_routes(api.client.app)))  # type: ignore[arg-type]
    assert_answered(api.client.request(method, fill(template, value), headers=api.headers()))
