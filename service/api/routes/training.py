"""Training jobs: start (the controller), progress and history (the volume), cancel.

A `{job_id}` is taken as sent: `JobStore` checks it against `JOB_ID_PATTERN` before any path is
built from it, so an id that cannot be one (a NUL byte, thousands of characters, a dot file)
is 404 `job_not_found` like any unknown id, and the message quotes at most 64 characters."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Body, Query

from service import schemas
from service.api.deps import ApiToken, ControllerDep, JobsDep

router = APIRouter(tags=["training"], dependencies=[ApiToken])


@router.post("/v1/train", status_code=202, response_model=schemas.TrainStartedPublic,
             responses={409: {"model": schemas.ErrorPublic}})
async def start_training(controller: ControllerDep,
                         overrides: dict[str, Any] | None = Body(None)
                         ) -> schemas.TrainStartedPublic:
    record = await controller.start(overrides or {}, "api")
    return schemas.TrainStartedPublic(job_id=record["job_id"], status=record["status"])


@router.get("/v1/train", response_model=schemas.JobsPublic)
async def list_jobs(jobs: JobsDep, limit: int = Query(100, ge=1, le=10_000)
                    ) -> schemas.JobsPublic:
    def views() -> list[dict[str, Any]]:
        return [jobs.view(r["job_id"]) if r.get("status") == "running" else r
                for r in jobs.list()[:limit]]
    return schemas.JobsPublic(jobs=[schemas.JobPublic.model_validate(r)
                                    for r in await asyncio.to_thread(views)])


@router.get("/v1/train/{job_id}", response_model=schemas.JobPublic,
            responses={404: {"model": schemas.ErrorPublic}})
async def get_job(job_id: str, jobs: JobsDep) -> schemas.JobPublic:
    return schemas.JobPublic.model_validate(await asyncio.to_thread(jobs.view, job_id))


@router.delete("/v1/train/{job_id}", status_code=202, response_model=schemas.JobPublic,
               responses={404: {"model": schemas.ErrorPublic}})
async def cancel_job(job_id: str, controller: ControllerDep) -> schemas.JobPublic:
    return schemas.JobPublic.model_validate(await controller.cancel(job_id))
