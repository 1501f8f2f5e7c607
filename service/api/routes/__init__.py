"""One router per resource, aggregated into `api_router`."""

from fastapi import APIRouter

from service.api.routes import exchange, labels, models, ops, predict, review, training, web

api_router = APIRouter()
for _module in (ops, predict, labels, review, training, models, exchange, web):
    api_router.include_router(_module.router)
