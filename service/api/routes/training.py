"""Training jobs: start and resume (the controller), progress and history (the volume), cancel.

`POST /v1/train/{job_id}/resume` reruns a failed, cancelled or interrupted job under its id from
its last checkpoint, with its config and dataset snapshot (202, the record: `queued`,
`resumed_from_epoch`, `resumes`); 404 unknown id, 409 `job_running` while a job runs (naming
it, as every `job_running` does), 409 `job_not_resumable` saying why (it succeeded; it has
neither a checkpoint nor its snapshot; its snapshot is gone and the dataset changed).
`GET /v1/train` lists every record newest first with what `visionloop jobs` shows: `job_id`,
`status`, `source` (api, schedule, cli), `created_at`, `started_at`, `finished_at`, `progress`,
`version`, `promoted`, `reason`, and for a resumed job `resumed_from_epoch` and `resumes`.

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


@router.post("/v1/train/{job_id}/resume", status_code=202, response_model=schemas.JobPublic,
             responses={404: {"model": schemas.ErrorPublic}, 409: {"model": schemas.ErrorPublic},
                        400: {"model": schemas.ErrorPublic}})
async def resume_job(job_id: str, controller: ControllerDep) -> schemas.JobPublic:
    return schemas.JobPublic.model_validate(await controller.resume(job_id, "api"))


@router.delete("/v1/train/{job_id}", status_code=202, response_model=schemas.JobPublic,
               responses={404: {"model": schemas.ErrorPublic}})
async def cancel_job(job_id: str, controller: ControllerDep) -> schemas.JobPublic:
    return schemas.JobPublic.model_validate(await controller.cancel(job_id))
