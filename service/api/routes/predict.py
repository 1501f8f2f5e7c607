"""POST /v1/predict: classify one or many images with this replica's classifier: the served
model, or the version named by `?version=` (loaded by this replica; see
`service.classifier.Classifier.model_for`)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Query, Response

from service import schemas
from service.api.deps import ClassifierDep, MetricsDep, PredictionsDep, PredictToken
from service.api.errors import Unavailable
from service.api.uploads import PredictFiles
from service.classifier import ModelNotLoaded, Prediction
from service.predictions import new_prediction_id
from training.errors import DomainError
from training.registry import InvalidVersion, VersionNotFound

log = logging.getLogger(__name__)

router = APIRouter(tags=["predict"])

_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": schemas.PredictJsonRequest.model_json_schema()}}}}


@router.post("/v1/predict", response_model=schemas.PredictPublic, dependencies=[PredictToken],
             responses={404: {"model": schemas.ErrorPublic}, 409: {"model": schemas.ErrorPublic},
                        413: {"model": schemas.ErrorPublic}, 415: {"model": schemas.ErrorPublic},
                        503: {"model": schemas.ErrorPublic}},
             openapi_extra=_BODY)
async def predict(files: PredictFiles, response: Response, classifier: ClassifierDep,
                  predictions: PredictionsDep, metrics: MetricsDep,
                  top_k: int = Query(5, ge=1, le=1000),
                  version: str | None = Query(
                      None, description="answer with this version (v0, v1, ...) instead of the "
                      "served one: 404 version_not_found for a version that is not there, 409 "
                      "invalid_version for one that cannot be loaded")
                  ) -> schemas.PredictPublic:
    """The answer's `model_version` (and `X-Model-Version`) names the version that computed
    every prediction of it."""
    results = await asyncio.gather(*(classifier.predict(data, top_k, version)
                                     for _, data in files), return_exceptions=True)
    answers: list[Prediction] = []
    for (name, _), result in zip(files, results, strict=True):
        if isinstance(result, ModelNotLoaded | VersionNotFound | InvalidVersion):
            raise result  # about the model, not this image
        if isinstance(result, DomainError):  # this image refused: say which one
            raise DomainError(f"{name}: {result.message}" if name else result.message,
                              code=result.code, status=result.status, headers=result.headers)
        if isinstance(result, BaseException):
            log.warning("classifier call failed: %r", result)
            raise Unavailable(f"the classifier is unavailable: {type(result).__name__}")
        answers.append(result)
    out = []
    for (name, data), answer in zip(files, answers, strict=True):
        top = [schemas.ScoredLabel(label=label, score=score) for label, score in answer.top_k]
        pid = new_prediction_id()
        metrics.predictions.labels(answer.version).inc()
        metrics.batch_size.observe(answer.batch_size)
        record = {"model_version": answer.version, "label": top[0].label,
                  "score": top[0].score, "top_k": [t.model_dump() for t in top],
                  "filename": name}
        # Never raises for the volume's state: not kept (low space, full, ...) is counted, and
        # feedback for it answers 404 saying why; the answer stands either way.
        kept = await asyncio.to_thread(predictions.save, pid, data, record)
        if kept != "stored":
            metrics.predictions_not_stored.labels(kept).inc()
        out.append(schemas.PredictionPublic(prediction_id=pid, filename=name,
                                            label=top[0].label, score=top[0].score, top_k=top))
    version = answers[0].version
    response.headers["X-Model-Version"] = version
    return schemas.PredictPublic(model_version=version, predictions=out)
