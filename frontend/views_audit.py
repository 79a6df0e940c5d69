"""Console pages for compliance officers: search the audit log, read one record, verify the chain,
export what they found.

Auditors and platform administrators read (OVERSIGHT_ROLES, as GET /api/v1/audit/records/); the
pages have no edit controls because nothing here changes the log. Filters mean what they mean in
`citadel audit export` (citadel.audit.export.records_filtered), so an export of the filtered view
holds exactly the records on screen. Verification is citadel.audit.verification.chain_verify, the
same check as `citadel audit verify`; the console's run is itself audited (audit.verify), as the
export is by the audit app. Both are GETs: an auditor's session may not POST (AuditorReadOnlyMiddleware),
and neither changes anything but the log's own record of having been read.
"""

import json
import tempfile
from datetime import datetime

from django.core.paginator import Paginator
from django.db.models import Q
from django.http import Http404, StreamingHttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from django.utils.http import urlencode

from citadel.accounts.permissions import OVERSIGHT_ROLES, role_required
from citadel.audit.export import FORMATS, audit_export, records_filtered
from citadel.audit.models import AuditCheckpoint, AuditRecord
from citadel.audit.services import Actor, audit_record
from citadel.audit.verification import chain_verify
from citadel.core.exceptions import CitadelError

PAGE_SIZE = 50
FILTERS = ("actor", "action", "target", "outcome", "since", "until")


def _when(value: str, name: str, errors: dict) -> datetime | None:
    """A time filter from a datetime-local input (or a bare date), in the server's time zone."""
    value = (value or "").strip()
    if not value:
        return None
    parsed = parse_datetime(value)
    if parsed is None and parse_date(value) is not None:
        parsed = datetime.combine(parse_date(value), datetime.min.time())
    if parsed is None:
        errors[name] = f"'{value}' is not a date and time: use YYYY-MM-DD or YYYY-MM-DDTHH:MM."
        return None
    return timezone.make_aware(parsed) if timezone.is_naive(parsed) else parsed


def audit_filters(params) -> tuple[dict, dict, dict]:
    """(the form's values, records_filtered's keyword arguments plus target, field errors)."""
    form = {name: (params.get(name) or "").strip() for name in FILTERS}
    errors: dict[str, str] = {}
    if form["outcome"] and form["outcome"] not in AuditRecord.Outcome.values:
        errors["outcome"] = f"outcome must be one of {', '.join(AuditRecord.Outcome.values)}."
    since, until = _when(form["since"], "since", errors), _when(form["until"], "until", errors)
    if since and until and until <= since:
        errors["until"] = "until must be later than since."
    query = {"since": since, "until": until, "actor": form["actor"], "action": form["action"],
             "outcome": form["outcome"] if "outcome" not in errors else ""}
    return form, query, errors


def _records(query: dict, target: str):
    records = records_filtered(**query)
    if target:  # "type:id" names one target; a bare value matches either part
        kind, _, ident = target.partition(":")
        records = (records.filter(target_type=kind, target_id=ident) if ident
                   else records.filter(Q(target_id=target) | Q(target_type=target)))
    return records


@role_required(OVERSIGHT_ROLES)
def audit_page(request):
    form, query, errors = audit_filters(request.GET)
    records = _records(query, form["target"]).order_by("-sequence") if not errors else AuditRecord.objects.none()
    page = Paginator(records, PAGE_SIZE).get_page(request.GET.get("page"))
    last_checkpoint = AuditCheckpoint.objects.order_by("-sequence", "-id").first()
    export_query = urlencode({k: v for k, v in form.items() if v and k != "target"})
    return render(request, "frontend/audit/list.html", {
        "form": form, "errors": errors, "page": page, "outcomes": AuditRecord.Outcome.values,
        "last_checkpoint": last_checkpoint, "formats": FORMATS, "export_query": export_query,
    }, status=400 if errors else 200)


@role_required(OVERSIGHT_ROLES)
def audit_record_page(request, sequence: int):
    record = AuditRecord.objects.filter(sequence=sequence).first()
    if record is None:
        raise Http404(f"No audit record with sequence {sequence}.")
    neighbours = {"previous": AuditRecord.objects.filter(sequence__lt=sequence).order_by("-sequence").first(),
                  "next": AuditRecord.objects.filter(sequence__gt=sequence).order_by("sequence").first()}
    signed_by = AuditCheckpoint.objects.filter(sequence__gte=sequence).order_by("sequence", "id").first()
    return render(request, "frontend/audit/record.html", {
        "record": record, "signed_by": signed_by, "details": json.dumps(record.details, indent=2, sort_keys=True,
                                                                         ensure_ascii=False), **neighbours})


@role_required(OVERSIGHT_ROLES)
def audit_verify(request):
    """Verify the whole chain now and show the result; htmx swaps it into the page, a plain GET
    renders it as a page of its own."""
    result = chain_verify()
    audit_record(actor=Actor.for_user(request.user), action="audit.verify",
                 outcome="success" if result.ok else "failure", target_type="audit_log", request=request,
                 details={"records": result.records, "last_sequence": result.last_sequence,
                          "last_signed_sequence": result.last_signed_sequence,
                          "problems": len(result.problems), "summary": result.summary()[:500]})
    problems = sorted(result.problems, key=lambda p: p.sequence)[:10]
    template = "frontend/audit/_verify.html" if request.htmx else "frontend/audit/verify.html"
    return render(request, template, {"result": result, "problems": problems})


def _refused(request, form: dict, errors: dict, *, status: int):
    """The search page with the refusal next to its field and no records (an export that did not run)."""
    page = Paginator(AuditRecord.objects.none(), PAGE_SIZE).get_page(1)
    return render(request, "frontend/audit/list.html", {
        "form": form, "errors": errors, "page": page, "outcomes": AuditRecord.Outcome.values, "formats": FORMATS,
        "export_query": ""}, status=status)


@role_required(OVERSIGHT_ROLES)
def audit_download(request):
    """The filtered records (with every checkpoint, purge manifest and public key) as JSON Lines or
    CSV, written by the audit app's export, which audits it before the first row."""
    form, query, errors = audit_filters(request.GET)
    fmt = request.GET.get("format", "jsonl")
    if fmt not in FORMATS:
        errors["format"] = f"format must be one of {', '.join(FORMATS)}."
    if form["target"]:
        errors["target"] = ("The export filters by actor, action, outcome and time; clear the target filter "
                            "to export (records of one target are found by searching).")
    if errors:
        return _refused(request, form, errors, status=400)
    spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024, mode="w+", encoding="utf-8", newline="")
    try:
        audit_export(out=spool, fmt=fmt, actor=Actor.for_user(request.user), since=query["since"],
                     until=query["until"], actor_filter=query["actor"], action=query["action"],
                     outcome=query["outcome"], request=request)
    except CitadelError as error:
        spool.close()
        return _refused(request, form, {error.param or "format": error.message}, status=error.status)
    spool.seek(0)

    def chunks():
        with spool:
            while block := spool.read(64 * 1024):
                yield block

    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    content_type = "application/x-ndjson" if fmt == "jsonl" else "text/csv"
    response = StreamingHttpResponse(chunks(), content_type=f"{content_type}; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="citadel-audit-{stamp}.{fmt}"'
    return response
