"""Usage as CSV, one row per day, team, key, model and kind: what finance loads into a spreadsheet.
Shared by the management API and the console so both export the same columns."""

import csv
import io

from django.db.models import QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDay

COLUMNS = ["day", "team", "api_key", "model", "kind", "requests", "prompt_tokens", "completion_tokens",
           "total_tokens", "gpu_seconds"]


def usage_csv(records: QuerySet) -> str:
    rows = (records.annotate(day=TruncDay("created_at"))
            .values("day", "team__name", "api_key__prefix", "model_name", "kind")
            .annotate(requests=Coalesce(Sum("requests"), 0), prompt=Coalesce(Sum("prompt_tokens"), 0),
                      completion=Coalesce(Sum("completion_tokens"), 0), gpu=Coalesce(Sum("gpu_seconds"), 0.0))
            .order_by("day", "team__name", "api_key__prefix", "model_name", "kind"))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([row["day"].date().isoformat(), row["team__name"] or "", row["api_key__prefix"] or "",
                         row["model_name"], row["kind"], row["requests"], row["prompt"], row["completion"],
                         row["prompt"] + row["completion"], f"{row['gpu']:.3f}"])
    return out.getvalue()
