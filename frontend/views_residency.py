"""Console pages for residency administration: sites with their worker pools, data classes, and a
policy editor beside the dry-run checker (views.residency_dry_run, unchanged).

Access is the management API's (citadel.residency.apis): auditors and platform administrators read,
platform administrators change. The form is checked by the API's own PolicyInput serializer and
written by citadel.residency.services (policy_create / policy_update / policy_delete), which validate
the policy, refuse a second policy for the same team and class, and audit the values before and
after; each refusal is shown next to the field it is about. Deleting asks on a page of its own.
"""

from django.core.paginator import Paginator
from django.db.models import Q
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import urlencode
from django.utils.text import slugify

from citadel.accounts.models import Team
from citadel.accounts.permissions import OVERSIGHT_ROLES, is_platform_admin, role_required, team_ids
from citadel.audit.services import Actor
from citadel.core.exceptions import CitadelError, Conflict, NotFound
from citadel.residency import services
from citadel.residency.apis import PolicyInput
from citadel.residency.models import DataClass, Policy, Site

PLATFORM_ADMINS = frozenset()
"""role_required(PLATFORM_ADMINS): only a platform administrator changes residency (write_roles = frozenset())."""
PAGE_SIZE = 25
LIST_FIELDS = ("processing_sites", "storage_sites")
TEXT_LISTS = ("processing_jurisdictions", "storage_jurisdictions")


def policies_visible(user):
    """The policies a reader sees, as GET /api/v1/residency/policies/ answers them: a platform
    administrator all, others those of keys without a team and of their own teams."""
    policies = Policy.objects.select_related("team", "data_class").prefetch_related("processing_sites",
                                                                                    "storage_sites")
    if is_platform_admin(user):
        return policies
    return policies.filter(Q(team__isnull=True) | Q(team__in=team_ids(user)))


@role_required(OVERSIGHT_ROLES)
def residency_admin_page(request):
    policies = policies_visible(request.user)
    team, data_class = request.GET.get("team", ""), request.GET.get("data_class", "")
    if team == "-":
        policies = policies.filter(team__isnull=True)
    elif team:
        policies = policies.filter(team__name=team)
    if data_class:
        policies = policies.filter(data_class__name=data_class)
    page = Paginator(policies, PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "frontend/residency_admin/overview.html", {
        "sites": Site.objects.prefetch_related("pools"), "data_classes": DataClass.objects.all(),
        "teams": Team.objects.order_by("name"), "page": page, "filter": {"team": team, "data_class": data_class},
        "can_change": is_platform_admin(request.user), "done": request.GET.get("done", ""),
    })


def _form_values(post) -> dict:
    values = {"team": post.get("team", ""), "data_class": post.get("data_class", ""),
              "prompt_retention": post.get("prompt_retention", Policy.Retention.NONE),
              "retention_days": post.get("retention_days", "").strip(),
              "fine_tuning_allowed": post.get("fine_tuning_allowed") in ("on", "true", "1"),
              "description": post.get("description", "")}
    for name in LIST_FIELDS:
        values[name] = post.getlist(name)
    for name in TEXT_LISTS:
        values[name] = post.get(name, "")
    return values


def _values_of(policy: Policy) -> dict:
    return {"team": policy.team.name if policy.team_id else "", "data_class": policy.data_class.name,
            "prompt_retention": policy.prompt_retention,
            "retention_days": "" if policy.retention_days is None else str(policy.retention_days),
            "fine_tuning_allowed": policy.fine_tuning_allowed, "description": policy.description,
            "processing_sites": [s.name for s in policy.processing_sites.all()],
            "storage_sites": [s.name for s in policy.storage_sites.all()],
            "processing_jurisdictions": ", ".join(policy.processing_jurisdictions),
            "storage_jurisdictions": ", ".join(policy.storage_jurisdictions)}


def _checked(values: dict) -> tuple[dict, dict]:
    """The service's keyword arguments from the form, and field errors (the API's serializer's first)."""
    data = {key: values[key] for key in ("data_class", "prompt_retention", "fine_tuning_allowed", "description",
                                         *LIST_FIELDS)}
    data["team"] = values["team"] or None
    data["retention_days"] = values["retention_days"] or None
    for name in TEXT_LISTS:
        data[name] = [part.strip() for part in values[name].split(",") if part.strip()]
    serializer = PolicyInput(data=data)
    if not serializer.is_valid():
        return {}, {name: str(messages[0]) for name, messages in serializer.errors.items()}
    fields = dict(serializer.validated_data)
    errors = {}
    if fields["team"]:
        fields["team"] = Team.objects.filter(name=fields["team"]).first()
        if fields["team"] is None:
            errors["team"] = f"No team named '{data['team']}'."
    try:
        fields["data_class"] = services.data_class_get(name=fields["data_class"])
    except NotFound as error:
        errors["data_class"] = error.message
    for name in LIST_FIELDS:
        sites = list(Site.objects.filter(name__in=fields.get(name, [])))
        missing = sorted(set(fields.get(name, [])) - {s.name for s in sites})
        if missing:
            errors[name] = f"No site named {', '.join(missing)}."
        fields[name] = sites
    return fields, errors


def _error_field(error: CitadelError) -> str:
    """Where a service's refusal belongs on the form: its param, or (a duplicate) the data class."""
    if error.param:
        return error.param
    return "data_class" if isinstance(error, Conflict) else "form"


def _policy_form(request, *, policy: Policy | None):
    if request.method == "POST":
        values = _form_values(request.POST)
        fields, errors = _checked(values)
        if not errors:
            actor = Actor.for_user(request.user)
            try:
                if policy is None:
                    saved = services.policy_create(actor=actor, request=request, **fields)
                    done = f"Created policy {saved.pk}"
                else:
                    saved = services.policy_update(policy=policy, actor=actor, request=request, **fields)
                    done = f"Saved policy {saved.pk}"
                return _back(done)
            except CitadelError as error:
                errors[_error_field(error)] = error.message
        status = 400
    else:
        values = _values_of(policy) if policy is not None else _form_values(request.GET)
        errors, status = {}, 200
    return render(request, "frontend/residency_admin/policy_form.html", {
        "policy": policy, "values": values, "errors": errors, "teams": Team.objects.order_by("name"),
        "data_classes": DataClass.objects.all(), "sites": Site.objects.all(),
        "retentions": Policy.Retention.choices,
    }, status=status)


def _back(done: str):
    """To the overview, saying what was done (a redirect, so a reload repeats nothing)."""
    return redirect(f"{reverse('frontend:residency-admin')}?{urlencode({'done': done})}")


def _policy(pk: int) -> Policy:
    policy = Policy.objects.select_related("team", "data_class").filter(pk=pk).first()
    if policy is None:
        raise Http404(f"No policy {pk}.")
    return policy


@role_required(PLATFORM_ADMINS)
def policy_new(request):
    return _policy_form(request, policy=None)


@role_required(PLATFORM_ADMINS)
def policy_edit(request, pk: int):
    return _policy_form(request, policy=_policy(pk))


@role_required(PLATFORM_ADMINS)
def policy_delete(request, pk: int):
    """GET asks; POST deletes (audited by the service) and goes back to the list."""
    policy = _policy(pk)
    if request.method == "POST":
        services.policy_delete(policy=policy, actor=Actor.for_user(request.user), request=request)
        return _back(f"Deleted policy {pk}")
    return render(request, "frontend/residency_admin/policy_delete.html", {"policy": policy})


# Sites and data classes ----------------------------------------------------------------------------------

SITE_FIELDS = ("name", "region", "jurisdiction", "storage_path", "description")
CLASS_FIELDS = ("name", "rank", "description", "audit_retention_days")
FIELD_LABELS = {
    "name": ("Name", ""), "region": ("Region", "e.g. eu-central, Frankfurt DC2."),
    "jurisdiction": ("Jurisdiction", "The legal area, e.g. EU, DE, US; 'unspecified' matches no rule by "
                                     "jurisdiction, only policies that name the site."),
    "storage_path": ("Storage path", "Where files stored at this site live."),
    "description": ("Description", ""),
    "rank": ("Rank", "Sensitivity: higher is more sensitive; a request may raise its class, never lower it."),
    "audit_retention_days": ("Audit retention (days)", "Keep audit records about this class this long; 0: "
                                                       "forever; empty: the platform's default."),
}


def _site(pk: int) -> Site:
    site = Site.objects.filter(pk=pk).first()
    if site is None:
        raise Http404(f"No site {pk}.")
    return site


def _data_class(pk: int) -> DataClass:
    data_class = DataClass.objects.filter(pk=pk).first()
    if data_class is None:
        raise Http404(f"No data class {pk}.")
    return data_class


def _edit_form(request, *, kind: str, obj, fields: tuple, clean, save):
    """GET shows the form (filled from `obj` when editing); POST cleans it, saves through the residency
    service and goes back to the overview, or shows each refusal next to its field."""
    errors, status = {}, 200
    if request.method == "POST":
        values = {name: request.POST.get(name, "").strip() for name in fields}
        changes = clean(values, errors)
        if not errors:
            try:
                saved = save(changes)
                return _back(f"Saved {kind} {saved.name}")
            except CitadelError as error:
                errors[error.param or "name"] = error.message
        status = 400
    else:
        values = {name: "" if obj is None or getattr(obj, name) is None else str(getattr(obj, name))
                  for name in fields}
        if obj is None and kind == "site":
            values["jurisdiction"] = "unspecified"
    rows = [{"name": name, "label": FIELD_LABELS[name][0], "help": FIELD_LABELS[name][1], "value": values[name],
             "error": errors.get(name)} for name in fields]
    return render(request, "frontend/residency_admin/object_form.html", {
        "kind": kind, "obj": obj, "rows": rows, "errors": errors}, status=status)


def _clean_site(values: dict, errors: dict) -> dict:
    return dict(values)


def _clean_class(values: dict, errors: dict) -> dict:
    changes = {"name": values["name"].lower(), "description": values["description"]}
    if not changes["name"] or slugify(changes["name"]) != changes["name"]:
        errors["name"] = "name must be a slug: lower-case letters, digits, '-' and '_' (e.g. phi, pci-cards)."
    for name, empty in (("rank", "rank must be a whole number: higher is more sensitive."),
                        ("audit_retention_days", None)):
        if not values[name]:
            if empty:
                errors[name] = empty
            changes[name] = None
            continue
        if not values[name].isdigit():
            errors[name] = f"{name} must be a whole number of 0 or more."
        else:
            changes[name] = int(values[name])
    return changes


@role_required(PLATFORM_ADMINS)
def site_new(request):
    actor = Actor.for_user(request.user)
    return _edit_form(request, kind="site", obj=None, fields=SITE_FIELDS, clean=_clean_site,
                      save=lambda c: services.site_create(actor=actor, request=request, **c))


@role_required(PLATFORM_ADMINS)
def site_edit(request, pk: int):
    site, actor = _site(pk), Actor.for_user(request.user)
    return _edit_form(request, kind="site", obj=site, fields=SITE_FIELDS, clean=_clean_site,
                      save=lambda c: services.site_update(site=site, actor=actor, request=request, **c))


@role_required(PLATFORM_ADMINS)
def data_class_new(request):
    actor = Actor.for_user(request.user)
    return _edit_form(request, kind="data class", obj=None, fields=CLASS_FIELDS, clean=_clean_class,
                      save=lambda c: services.data_class_create(actor=actor, request=request, **c))


@role_required(PLATFORM_ADMINS)
def data_class_edit(request, pk: int):
    data_class, actor = _data_class(pk), Actor.for_user(request.user)
    return _edit_form(request, kind="data class", obj=data_class, fields=CLASS_FIELDS, clean=_clean_class,
                      save=lambda c: services.data_class_update(data_class=data_class, actor=actor, request=request,
                                                                **c))


def _delete(request, *, kind: str, obj, delete, consequence: str):
    error = None
    if request.method == "POST":
        try:
            delete()
            return _back(f"Deleted {kind} {obj.name}")
        except CitadelError as failure:
            error = failure.message
    return render(request, "frontend/residency_admin/object_delete.html", {
        "kind": kind, "obj": obj, "error": error, "consequence": consequence}, status=409 if error else 200)


@role_required(PLATFORM_ADMINS)
def site_delete(request, pk: int):
    site = _site(pk)
    return _delete(request, kind="site", obj=site, consequence="Policies that name it no longer allow it.",
                   delete=lambda: services.site_delete(site=site, actor=Actor.for_user(request.user),
                                                       request=request))


@role_required(PLATFORM_ADMINS)
def data_class_delete(request, pk: int):
    data_class = _data_class(pk)
    return _delete(request, kind="data class", obj=data_class,
                   consequence="Keys and policies can no longer name it.",
                   delete=lambda: services.data_class_delete(data_class=data_class,
                                                             actor=Actor.for_user(request.user), request=request))
