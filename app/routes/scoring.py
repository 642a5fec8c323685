"""POST /score and POST /score/batch (DESIGN.md section 5)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from app.dependencies import ServiceDep, SettingsDep, require_api_key
from app.errors import PayloadTooLarge, UnprocessableContent, UnsupportedMediaType
from app.openapi_examples import batch_example_response, score_example_response
from app.routes._docs import problem_responses
from app.schemas import BatchScoreResponse, ScoreResult
from app.service import Upload
from app.store.lifespan import record_served
from app.uploads import Part, content_type_of, read_body, read_multipart

router = APIRouter(prefix="/score", tags=["scoring"], dependencies=[Depends(require_api_key)])

IncludeMembersQuery = Annotated[
    bool, Query(description="add each ensemble member's own scores under `members`")
]

_BINARY = {"type": "string", "format": "binary"}
_SINGLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": _BINARY},
                    "required": ["image"],
                }
            },
            "image/*": {"schema": _BINARY},
        },
    }
}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": _BINARY}},
                    "required": ["images"],
                }
            }
        },
    }
}
_ERRORS = problem_responses(400, 401, 413, 415, 422, 503)


def _unexpected_parts(parts: list[Part], expected: str, endpoint: str) -> None:
    others = sorted({part.name for part in parts if part.name != expected})
    if others:
        raise UnprocessableContent(
            f"{endpoint} takes parts named {expected!r}; got unexpected parts named "
            f"{', '.join(repr(name) for name in others)}"
        )


def _nonempty(part: Part, label: str) -> Upload:
    if not part.data:
        raise UnprocessableContent(f"{label} is empty (0 bytes); expected an image file")
    return Upload(label, part.data)


async def _single_upload(request: Request, max_batch_images: int) -> Upload:
    media_type, params = content_type_of(request)
    if media_type == "multipart/form-data":
        parts = await read_multipart(
            request,
            params,
            max_parts=max(max_batch_images, 1),
            too_many_parts=lambda: UnprocessableContent(
                "POST /score takes one part named 'image'; the body has many more parts. "
                "Send several images to POST /score/batch as parts named 'images'"
            ),
        )
        images = [part for part in parts if part.name == "image"]
        if not images:
            found = ", ".join(repr(part.name) for part in parts) or "none"
            hint = " (several images go to POST /score/batch)" if "images" in found else ""
            raise UnprocessableContent(
                f"POST /score needs a multipart part named 'image'; parts found: {found}{hint}"
            )
        _unexpected_parts(parts, "image", "POST /score")
        if len(images) > 1:
            raise UnprocessableContent(
                f"POST /score takes exactly one part named 'image', got {len(images)}; "
                "send several images to POST /score/batch as parts named 'images'"
            )
        return _nonempty(images[0], images[0].label())
    if media_type.startswith("image/"):
        data = await read_body(request)
        if not data:
            raise UnprocessableContent(
                f"the request body is empty (0 bytes); Content-Type {media_type!r} "
                "announces an image"
            )
        return Upload(f"request body ({media_type})", data)
    raise UnsupportedMediaType(
        (f"Content-Type {media_type!r} is not accepted" if media_type else "no Content-Type")
        + ": POST /score takes multipart/form-data with one part named 'image', or the image "
        "itself as the body with an image/* Content-Type (e.g. image/png)"
    )


async def _batch_uploads(request: Request, max_batch_images: int) -> list[Upload]:
    media_type, params = content_type_of(request)
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(
            (f"Content-Type {media_type!r} is not accepted" if media_type else "no Content-Type")
            + ": POST /score/batch takes multipart/form-data with one part named 'images' "
            "per image"
        )
    parts = await read_multipart(
        request,
        params,
        max_parts=max_batch_images,
        too_many_parts=lambda: PayloadTooLarge(
            f"the batch has more than {max_batch_images} images, the limit per request "
            "(GRADUNC_MAX_BATCH_IMAGES); split it into several requests",
            limit="GRADUNC_MAX_BATCH_IMAGES",
            limit_value=max_batch_images,
        ),
    )
    if not any(part.name == "images" for part in parts):
        found = ", ".join(repr(part.name) for part in parts) or "none"
        raise UnprocessableContent(
            f"POST /score/batch needs one or more multipart parts named 'images'; "
            f"parts found: {found}"
        )
    _unexpected_parts(parts, "images", "POST /score/batch")
    return [_nonempty(part, part.label(index)) for index, part in enumerate(parts)]


@router.post(
    "",
    response_model=ScoreResult,
    response_model_exclude_none=True,
    summary="Score one image",
    responses={200: score_example_response(), **_ERRORS},
    openapi_extra=_SINGLE_BODY,
)
async def score_image(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    include_members: IncludeMembersQuery = False,
) -> Any:
    """One image, as a multipart part named `image` or as the raw body with an `image/*`
    Content-Type (PNG, JPEG, BMP, TIFF, GIF, WebP; any size and colour mode)."""
    service.require_ready()
    upload = await _single_upload(request, settings.max_batch_images)
    [result] = await service.score([upload], include_members)
    record_served(request, [result])  # gives it its request_id
    return result


@router.post(
    "/batch",
    response_model=BatchScoreResponse,
    response_model_exclude_none=True,
    summary="Score several images",
    responses={200: batch_example_response(), **_ERRORS},
    openapi_extra=_BATCH_BODY,
)
async def score_batch(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    include_members: IncludeMembersQuery = False,
) -> Any:
    """Several images as multipart parts named `images`; results in the order sent.
    At most GRADUNC_MAX_BATCH_IMAGES images per request."""
    service.require_ready()
    uploads = await _batch_uploads(request, settings.max_batch_images)
    results = await service.score(uploads, include_members)
    record_served(request, results)  # gives each its request_id
    return {"results": results}
