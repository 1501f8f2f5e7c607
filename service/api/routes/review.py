"""The review queue, a queued prediction's image, dismissing it, and feedback on a prediction.

`GET /v1/review` lists pending predictions (neither labelled nor dismissed) scored below
`below`, optionally only those predicted as `label`, most uncertain first. The default order is
`margin` (top-1 minus top-2, smallest first): it asks for the label where the model nearly gave
another answer, which is where a label moves the decision boundary; `entropy` ranks by how
spread out the top-k is, and over a truncated top-k of many classes (v0 has 1000) it mostly
measures the tail; `score` is the old least-confident-first order. Feedback and dismiss take an
item out of the queue; its image stays readable until retention removes the prediction.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Query, Response

from service import schemas
from service.api.deps import ApiToken, PredictionsDep, SettingsDep, StoreDep
from service.predictions import PredictionNotFound, PredictionStore, ReviewOrder, StoredPrediction
from training.dataset import check_label
from training.errors import DomainError

log = logging.getLogger(__name__)

router = APIRouter(tags=["dataset"], dependencies=[ApiToken])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": schemas.ErrorPublic}}


async def _image(predictions: PredictionStore, prediction_id: str
                 ) -> tuple[StoredPrediction, bytes]:
    """A kept prediction and its image bytes; PredictionNotFound (404) saying why not."""
    stored = await asyncio.to_thread(predictions.get, prediction_id)
    try:
        data = await asyncio.to_thread(stored.image_bytes)
    except OSError:  # removed by retention (or by hand) since the look
        raise PredictionNotFound(
            f"the image of prediction {prediction_id!r} is gone") from None
    return stored, data


@router.post("/v1/feedback", response_model=schemas.FeedbackPublic, responses=_NOT_FOUND)
async def feedback(body: schemas.FeedbackRequest, store: StoreDep,
                   predictions: PredictionsDep) -> schemas.FeedbackPublic:
    """The prediction's image joins the dataset under `label`, and leaves the review queue.
    Sent again with another label, it relabels the image."""
    check_label(body.label)
    _, data = await _image(predictions, body.prediction_id)
    r = await asyncio.to_thread(store.ingest, data, body.label, "feedback")
    try:
        await asyncio.to_thread(predictions.resolve, body.prediction_id, "labelled")
    except DomainError as exc:  # the label is stored, which is what feedback promises
        log.warning("feedback for %s stored; the review queue not updated: %s",
                    body.prediction_id, exc)
    return schemas.FeedbackPublic(prediction_id=body.prediction_id, sha256=r.sha256,
                                  label=r.label, status=r.status)


@router.get("/v1/review", response_model=schemas.ReviewPublic)
async def review(settings: SettingsDep, predictions: PredictionsDep,
                 limit: int = Query(50, ge=1, le=1000),
                 below: float | None = Query(None, ge=0.0, le=1.0),
                 label: str | None = Query(None, min_length=1, max_length=256,
                                           description="only predictions of this label"),
                 order: ReviewOrder = Query("margin", description="most uncertain first by")
                 ) -> schemas.ReviewPublic:
    threshold = settings.review_below if below is None else below
    items = await asyncio.to_thread(predictions.review, threshold, limit, label, order)
    return schemas.ReviewPublic(below=threshold, label=label, order=order, items=[
        schemas.ReviewItemPublic.model_validate(
            {**i, "image_url": f"/v1/review/{i['prediction_id']}/image"}) for i in items])


@router.post("/v1/review/{prediction_id}/dismiss", response_model=schemas.ReviewStatePublic,
             responses=_NOT_FOUND)
async def dismiss(prediction_id: str, predictions: PredictionsDep) -> schemas.ReviewStatePublic:
    """Take a prediction out of the review queue without labelling it (a labelled one stays
    labelled). Dismissing twice is harmless."""
    state = await asyncio.to_thread(predictions.resolve, prediction_id, "dismissed")
    return schemas.ReviewStatePublic.model_validate(
        {"prediction_id": prediction_id, "state": state})


@router.get("/v1/review/{prediction_id}/image", response_class=Response,
            responses={**_NOT_FOUND, 200: {"content": {"image/jpeg": {}, "image/png": {},
                                                       "image/webp": {}},
                                           "description": "the image as uploaded"}})
async def review_image(prediction_id: str, predictions: PredictionsDep) -> Response:
    """The image of a kept prediction, byte for byte as uploaded (JPEG, PNG or WebP, as the
    decoder judged it when it was predicted)."""
    stored, data = await _image(predictions, prediction_id)
    return Response(data, media_type=stored.media_type, headers={
        "X-Content-Type-Options": "nosniff",  # the type we say, never a sniffed one
        "Cache-Control": "private, max-age=3600"})
