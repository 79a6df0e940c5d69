"""Reads for batches: whose batches a caller sees (as for fine-tuning: a team key its team's, a key
without a team its user's own, a signed-in user what citadel.accounts.permissions.scope allows),
lookups by OpenAI id (404 outside that), and cursor pages newest first."""

import uuid

from django.db.models import Q, QuerySet

from citadel.accounts.permissions import scope
from citadel.batches.models import Batch
from citadel.core.exceptions import InvalidRequest, NotFound
from citadel.core.lookups import row_by_pk
from citadel.finetuning.selectors import Page


def batches_visible(*, request) -> QuerySet[Batch]:
    batches = Batch.objects.select_related("input_file", "output_file", "error_file", "model", "pool", "site",
                                           "data_class", "team")
    api_key = getattr(request, "auth", None)
    if api_key is not None and hasattr(api_key, "prefix"):
        if api_key.team_id:
            return batches.filter(team_id=api_key.team_id)
        return batches.filter(user=api_key.user, team__isnull=True)
    return scope(request.user, batches)


def _pk(batch_id: str, *, param: str) -> uuid.UUID:
    text = str(batch_id or "")
    try:
        if not text.startswith("batch_"):
            raise ValueError
        return uuid.UUID(hex=text[len("batch_"):])
    except ValueError:
        raise NotFound(f"No batch with id '{text}'.", param=param) from None


def batch_get(*, request, batch_id: str) -> Batch:
    batch = row_by_pk(batches_visible(request=request), _pk(batch_id, param="batch_id"))
    if batch is None:
        raise NotFound(f"No batch with id '{batch_id}'.", param="batch_id")
    return batch


def batches_page(*, request, after: str | None = None, limit=None) -> Page:
    try:
        size = 20 if limit in (None, "") else int(limit)
    except (TypeError, ValueError):
        size = 0
    if not 1 <= size <= 100:
        raise InvalidRequest("limit must be a whole number from 1 to 100.", param="limit")
    batches = batches_visible(request=request)
    if after:
        anchor = Batch.objects.filter(pk=_pk(after, param="after")).values("created_at", "id").first()
        if anchor is None:
            raise InvalidRequest(f"after: no batch with id '{after}'.", param="after")
        batches = batches.filter(Q(created_at__lt=anchor["created_at"])
                                 | Q(created_at=anchor["created_at"], id__lt=anchor["id"]))
    items = list(batches.order_by("-created_at", "-id")[: size + 1])
    return Page(items=items[:size], has_more=len(items) > size)
