"""POST /feedback: ground truth for served answers, by request id (DESIGN.md section 5)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.dependencies import ServiceDep, SettingsDep, require_api_key
from app.errors import PayloadTooLarge, UnprocessableContent, UnsupportedMediaType
from app.routes._docs import problem_responses
from app.store import FeedbackItem, StoreUnavailable
from app.store.lifespan import LiveStoreUnavailable, StoreDep
from app.store.schema import REQUEST_ID_MAX_LENGTH

router = APIRouter(
    prefix="/feedback", tags=["live quality"], dependencies=[Depends(require_api_key)]
)


async def require_json(request: Request) -> None:
    """415 for a body that is not JSON, before FastAPI tries to parse it as such."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            (f"Content-Type {media_type!r} is not accepted" if media_type else "no Content-Type")
            + ': POST /feedback takes application/json, {"items": [{"request_id": ..., '
            '"label": <int> | null, "ood": <bool>}]}'
        )


class FeedbackItemIn(BaseModel):
    """The truth about one served image: its class, or that it is none of them."""

    model_config = ConfigDict(extra="forbid")

    request_id: Annotated[str, Field(min_length=1, max_length=REQUEST_ID_MAX_LENGTH)] = Field(
        description="the `request_id` of the score object"
    )
    label: int | None = Field(
        default=None,
        ge=0,
        strict=True,  # "3" or 3.0 is a client bug worth a 422, not a guess
        description="the true class index (as `prediction`); null when the image is none of "
        "the classes",
    )
    ood: bool = Field(
        default=False,
        strict=True,
        description="true: the image is none of the classes (label null)",
    )

    @model_validator(mode="after")
    def _label_or_ood(self) -> FeedbackItemIn:
        if self.ood and self.label is not None:
            raise ValueError(
                f"item for {self.request_id!r}: label must be null when ood is true "
                f"(an out-of-distribution image has no class), got label {self.label}"
            )
        if not self.ood and self.label is None:
            raise ValueError(f"item for {self.request_id!r}: label is required unless ood is true")
        return self


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[FeedbackItemIn] = Field(
        min_length=1, description="at most GRADUNC_FEEDBACK_MAX_ITEMS items"
    )


class FeedbackResponse(BaseModel):
    """What was stored. Unknown ids were never served here, or are past retention."""

    received: int = Field(description="items in the request")
    matched: int = Field(description="items whose request id was found and stored")
    unknown: list[str] = Field(description="request ids not found, each once, in order")


def _check_labels(items: list[FeedbackItemIn], class_names: list[str] | None) -> None:
    """422 for a label past the loaded bundle's classes (when it is loaded)."""
    if not class_names:
        return
    for index, item in enumerate(items):
        if item.label is not None and item.label >= len(class_names):
            raise UnprocessableContent(
                f"items[{index}] ({item.request_id!r}): label {item.label} is not a class of "
                f"the loaded bundle, which has {len(class_names)} (0 to {len(class_names) - 1})"
            )


@router.post(
    "",
    response_model=FeedbackResponse,
    summary="Ground truth for served answers",
    dependencies=[Depends(require_json)],
    responses={
        400: {
            **problem_responses(400)[400],
            "description": "The body is not text (JSON encoded as UTF-8).",
        },
        **problem_responses(401, 413, 415, 422),
        503: {
            **problem_responses(503)[503],
            "description": "The live store is unreachable or still starting (Retry-After), "
            "or recording is off (GRADUNC_STORE_ENABLED=false, no Retry-After).",
        },
    },
)
async def post_feedback(
    body: FeedbackRequest, settings: SettingsDep, service: ServiceDep, store: StoreDep
) -> FeedbackResponse:
    """Attach true labels (or "none of the classes": `ood` true, `label` null) to the
    answers served under the given request ids. Answered only once committed; repeating
    an item changes nothing, and a later item for the same id replaces the earlier one.
    503 with Retry-After while the live store is unreachable (nothing is acknowledged
    then)."""
    if len(body.items) > settings.feedback_max_items:
        raise PayloadTooLarge(
            f"the request has {len(body.items)} feedback items, more than the limit of "
            f"{settings.feedback_max_items} (GRADUNC_FEEDBACK_MAX_ITEMS); split it",
            limit="GRADUNC_FEEDBACK_MAX_ITEMS",
            limit_value=settings.feedback_max_items,
        )
    _check_labels(body.items, getattr(service.scorer, "class_names", None))
    items = [FeedbackItem(item.request_id, item.label, item.ood) for item in body.items]
    try:
        future = store.submit_feedback(items)
        outcome = await asyncio.wait_for(asyncio.wrap_future(future), settings.store_timeout_s)
    except StoreUnavailable as error:
        raise LiveStoreUnavailable.from_error(error, settings.retry_after_s) from None
    except TimeoutError:
        raise LiveStoreUnavailable(
            f"the live store did not commit the feedback within {settings.store_timeout_s} s "
            "(GRADUNC_STORE_TIMEOUT_S); it may or may not be stored, and sending it again "
            "is safe",
            retry_after_s=settings.retry_after_s,
        ) from None
    return FeedbackResponse(
        received=outcome.received, matched=outcome.matched, unknown=outcome.unknown
    )
