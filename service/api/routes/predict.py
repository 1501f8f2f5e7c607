"""POST /v1/predict: classify one or many images with this replica's classifier: the served
model, or the version named by `?version=` (loaded by this replica; see
`service.classifier.Classifier.model_for`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Query, Response

from service import schemas
from service.api.deps import ClassifierDep, MetricsDep, PredictionsDep, PredictToken
from service.api.errors import Unavailable
from service.api.uploads import PredictFiles
from service.classifier import UNKNOWN, ModelNotLoaded, Prediction
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
                  min_score: float | None = Query(
                      None, ge=0.0, le=1.0, description="answer `unknown` below this "
                      "calibrated score instead of the version's threshold (0..1; 0: never "
                      "unknown)"),
                  version: str | None = Query(
                      None, description="answer with this version (v0, v1, ...) instead of the "
                      "served one: 404 version_not_found for a version that is not there, 409 "
                      "invalid_version for one that cannot be loaded")
                  ) -> schemas.PredictPublic:
    """The answer's `model_version` (and `X-Model-Version`) names the version that computed
    every prediction of it. A prediction whose calibrated score is below `min_score` (else the
    version's threshold) has label `unknown` and `unknown: true`, its top-k still given; it is
    kept with the model's own label and `unknown` set, and comes first in the review queue.
    While a version is on trial (`PUT /v1/models/trial`), a canary answer names the trial
    version; a shadow's answer is kept with the prediction and never shown."""
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
        unknown = answer.is_unknown(min_score)
        metrics.predictions.labels(answer.version).inc()
        metrics.batch_size.observe(answer.batch_size)
        metrics.scores.labels(answer.version).observe(top[0].score)
        if unknown:
            metrics.unknown.labels(answer.version).inc()
        record: dict[str, Any] = {
            "model_version": answer.version, "label": top[0].label, "score": top[0].score,
            "top_k": [t.model_dump() for t in top], "filename": name, "unknown": unknown}
        if answer.shadow is not None:  # kept for the trial's figures, never answered
            shadow = answer.shadow
            record["shadow"] = {"version": shadow.version, "label": shadow.label,
                                "score": shadow.score}
            metrics.shadow.labels(shadow.version).inc()
            if shadow.label == answer.label:
                metrics.shadow_agreed.labels(shadow.version).inc()
        # Never raises for the volume's state: not kept (low space, full, ...) is counted, and
        # feedback for it answers 404 saying why; the answer stands either way.
        kept = await asyncio.to_thread(predictions.save, pid, data, record)
        if kept != "stored":
            metrics.predictions_not_stored.labels(kept).inc()
        out.append(schemas.PredictionPublic(
            prediction_id=pid, filename=name, label=UNKNOWN if unknown else top[0].label,
            score=top[0].score, unknown=unknown,
            threshold=answer.threshold if min_score is None else min_score, top_k=top))
    version = answers[0].version
    response.headers["X-Model-Version"] = version
    return schemas.PredictPublic(model_version=version, predictions=out)
