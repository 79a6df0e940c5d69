"""Reads for residency: the record of processing activities (GDPR Art. 30 style).

Built from two sources: the policies (what is allowed: where each class of data may be processed
and stored, what is kept of prompts and for how long, which teams receive it) and the usage
recorded on inference jobs (where each class was actually processed, by which teams, how often).
"""

import csv
import io

from django.db.models import Count, Max, Min
from django.utils import timezone

from citadel.residency.models import DataClass, Policy
from citadel.residency.services import policy_snapshot, storage_sites


def ropa() -> dict:
    from citadel.jobs.models import InferenceJob

    activities = []
    policies = Policy.objects.select_related("team", "data_class").prefetch_related("processing_sites",
                                                                                    "storage_sites")
    for data_class in DataClass.objects.all():
        rows = [p for p in policies if p.data_class_id == data_class.pk]
        usage = (InferenceJob.objects.filter(data_class=data_class, site__isnull=False)
                 .values("site__name", "site__jurisdiction", "team__name")
                 .annotate(requests=Count("id"), first=Min("created_at"), last=Max("created_at"))
                 .order_by("site__name", "team__name"))
        processed = {}
        for row in usage:
            place = processed.setdefault(row["site__name"], {
                "site": row["site__name"], "jurisdiction": row["site__jurisdiction"], "requests": 0,
                "teams": set(), "first": row["first"], "last": row["last"]})
            place["requests"] += row["requests"]
            place["teams"].add(row["team__name"] or "(no team)")
            place["first"], place["last"] = min(place["first"], row["first"]), max(place["last"], row["last"])
        recipients = {p.team.name if p.team_id else "(no team)" for p in rows}
        recipients |= {team for place in processed.values() for team in place["teams"]}
        stored = sorted({site.name for p in rows for site in storage_sites(p)})
        activities.append({
            "data_class": data_class.name,
            "rank": data_class.rank,
            "policies": [policy_snapshot(p) for p in rows],
            "processed_at": [{**place, "teams": sorted(place["teams"]), "first": place["first"].isoformat(),
                              "last": place["last"].isoformat()} for place in processed.values()],
            "storage_allowed_at": stored,
            "retention": sorted({f"{p.prompt_retention}" + (f" ({p.retention_days} days)" if p.retention_days else "")
                                 for p in rows}),
            "recipients": sorted(recipients),
        })
    return {"generated_at": timezone.now().isoformat(), "activities": activities}


CSV_COLUMNS = ["data_class", "rank", "recipients", "processing_allowed", "processed_at", "requests",
               "storage_allowed_at", "retention", "fine_tuning_allowed_for"]


def ropa_csv(record: dict) -> str:
    """One row per data class; lists joined by '; '."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for activity in record["activities"]:
        allowed = []
        for p in activity["policies"]:
            where = p["processing_sites"] + p["processing_jurisdictions"]
            allowed.append(f"{p['team'] or '(no team)'}: {', '.join(where) or 'nowhere'}")
        writer.writerow({
            "data_class": activity["data_class"], "rank": activity["rank"],
            "recipients": "; ".join(activity["recipients"]),
            "processing_allowed": "; ".join(allowed),
            "processed_at": "; ".join(f"{p['site']} ({p['jurisdiction']})" for p in activity["processed_at"]),
            "requests": sum(p["requests"] for p in activity["processed_at"]),
            "storage_allowed_at": "; ".join(activity["storage_allowed_at"]),
            "retention": "; ".join(activity["retention"]),
            "fine_tuning_allowed_for": "; ".join(p["team"] or "(no team)" for p in activity["policies"]
                                                 if p["fine_tuning_allowed"]),
        })
    return out.getvalue()
