"""The HTTP API (FastAPI): `create_api` builds it; `service.api.routes` holds one router per
resource; `deps` the stores, clients and token checks as dependencies; `errors` the one error
shape; `guard` the in-flight and body-size bounds; `metrics` Prometheus; `uploads` reading
images out of requests; `clients` what the routes call (the classifier, the controller)."""

from service.api.main import create_api

__all__ = ["create_api"]
