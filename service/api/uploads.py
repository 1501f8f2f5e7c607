"""Reading images out of requests: multipart field `files` (repeatable) or JSON
`{"images": [base64, ...]}`, counted against `max_files` and checked from their headers
(format allow-list, pixel limit) before any is decoded. The byte limit is `RequestGuard`'s.

`PredictFiles` and `LabelUpload` are dependencies: a route that declares one gets the checked
images, or the request has already been answered with the refusal.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import schemas
from service.api.deps import SettingsDep
from service.api.errors import BadRequest, NoImages, TooManyFiles, UnsupportedMediaType
from service.settings import Settings
from training.dataset import check_label
from training.imageio import ImageError, decode_image, probe_image

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

Upload = tuple[str | None, bytes]  # (client's filename or None, the bytes)


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_multipart(request: Request, max_files: int
                         ) -> tuple[dict[str, list[tuple[str | None, bytes]]], dict[str, str]]:
    """Multipart -> (file parts by field name: [(client file name, bytes)], text fields), with
    the file count bounded (413) and an unreadable form refused (400)."""
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 16)
    except StarletteHTTPException as exc:
        if "too many files" in str(exc.detail).lower():
            raise TooManyFiles(f"more than {max_files} files in one request") from None
        raise BadRequest(f"unreadable form: {exc.detail}") from None
    files: dict[str, list[tuple[str | None, bytes]]] = {}
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.setdefault(key, []).append((value.filename, await value.read()))
        else:
            fields[key] = value
    return files, fields


async def read_form(request: Request, max_files: int) -> tuple[list[Upload], dict[str, str]]:
    """Multipart -> ([(filename, bytes) of field `files`], other text fields)."""
    files, fields = await read_multipart(request, max_files)
    return list(files.get("files", [])), fields


def check_count(count: int, max_files: int) -> None:
    if not count:
        raise NoImages("no images: send multipart field 'files' (repeatable) or JSON "
                       "{\"images\": [base64, ...]}")
    if count > max_files:
        raise TooManyFiles(f"{count} files in one request; the limit is {max_files}")


def probe(name: str | None, data: bytes, max_pixels: int, decode: bool = False) -> None:
    """Header check; with `decode`, a full decode too (a truncated file passes the header
    check, and one stored in the dataset would fail every training job)."""
    try:
        (decode_image if decode else probe_image)(data, max_pixels)
    except ImageError as exc:
        raise type(exc)(f"{name}: {exc}" if name else str(exc)) from None


async def _predict_inputs(request: Request, settings: Settings) -> list[Upload]:
    ctype = content_type(request)
    if ctype in FORM_TYPES:
        files, _ = await read_form(request, settings.max_files)
        return files
    if ctype == "application/json":
        try:
            body = schemas.PredictJsonRequest.model_validate_json(await request.body())
        except ValidationError as exc:  # pydantic's text names its model and docs URL
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                for e in exc.errors(include_url=False))
            raise BadRequest(f"invalid JSON body: {problems} (expected "
                             '{"images": ["<base64>", ...]})') from None
        check_count(len(body.images), settings.max_files)
        out: list[Upload] = []
        for i, b64 in enumerate(body.images):
            try:
                out.append((None, base64.b64decode(b64, validate=True)))
            except (binascii.Error, ValueError):
                raise BadRequest(f"images[{i}] is not valid base64") from None
        return out
    if not ctype and not await request.body():
        return []
    raise UnsupportedMediaType("send multipart/form-data (field 'files') or application/json")


async def predict_files(request: Request, settings: SettingsDep) -> list[Upload]:
    """The images of a predict request, counted and header-checked."""
    files = await _predict_inputs(request, settings)
    check_count(len(files), settings.max_files)
    for name, data in files:
        probe(name, data, settings.max_pixels)
    return files


@dataclass(frozen=True)
class LabelledImages:
    label: str
    files: list[Upload]


async def label_upload(request: Request, settings: SettingsDep) -> LabelledImages:
    """Multipart `label` + `files`: the label checked, every image fully decoded, all before
    any is stored."""
    if content_type(request) not in FORM_TYPES:
        raise UnsupportedMediaType("send multipart/form-data with fields 'label' and 'files'")
    files, fields = await read_form(request, settings.max_files)
    label = check_label(fields.get("label", ""))
    check_count(len(files), settings.max_files)
    for name, data in files:
        await asyncio.to_thread(probe, name, data, settings.max_pixels, True)
    return LabelledImages(label, files)


PredictFiles = Annotated[list[Upload], Depends(predict_files)]
LabelUpload = Annotated[LabelledImages, Depends(label_upload)]
