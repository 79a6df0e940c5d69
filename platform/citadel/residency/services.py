"""Residency decisions and the writes that change what they decide.

`decide()` is the one place that says where a request may run: every dispatch (the /v1 API,
the console playground, the dry run) goes through it. `deployment_check()` is its counterpart
for placing a model. Every change to sites, data classes and policies is audited with the
values before and after.
"""

from dataclasses import dataclass, field

from django.db import transaction

from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import Conflict, InvalidRequest, PermissionDenied
from citadel.residency.models import RETENTION_DAYS_MAX, UNSPECIFIED, DataClass, Policy, Site

HEADER = "X-Citadel-Data-Class"
PURPOSES = ("inference", "fine_tuning")


class ResidencyDenied(PermissionDenied):
    """A request or a deployment that residency policy refuses. Raised after it was audited."""

    code = "residency_denied"


# -- who is asking, about what data ------------------------------------------------------------

@dataclass(frozen=True)
class Subject:
    """Whose policy applies (team None: keys without a team) and the request's data class."""

    team: object | None
    data_class: DataClass
    key_class: DataClass

    @property
    def team_name(self) -> str | None:
        return self.team.name if self.team is not None else None


def data_class_get(*, name: str, param: str = "data_class") -> DataClass:
    data_class = DataClass.objects.filter(name=(name or "").strip().lower()).first()
    if data_class is None:
        known = ", ".join(DataClass.objects.values_list("name", flat=True))
        raise InvalidRequest(f"{param} names an unknown data class '{name}'; known classes: {known}.",
                             param=param, code="unknown_data_class")
    return data_class


def data_class_raise(*, key_class: DataClass, requested: str | None, param: str = HEADER) -> DataClass:
    """The class a request runs as: its key's, or a more sensitive one it asks for; never less."""
    if not requested or not requested.strip():
        return key_class
    wanted = data_class_get(name=requested, param=param)
    if wanted.pk == key_class.pk:
        return key_class
    if wanted.rank <= key_class.rank:
        raise InvalidRequest(
            f"{param} '{wanted.name}' (rank {wanted.rank}) would lower this key's data class "
            f"'{key_class.name}' (rank {key_class.rank}): a request may only raise its data class to a more "
            "sensitive one, never lower it.", param=param, code="data_class_lowered")
    return wanted


def request_subject(request, *, requested_class: str | None = None, param: str = HEADER) -> Subject:
    """Team and data class of an API request: from its API key, or for a console session from the
    user's one team (none: the policies for keys without a team). The header or `requested_class`
    may raise the class."""
    api_key = getattr(request, "auth", None)
    if api_key is not None and hasattr(api_key, "prefix"):
        team, key_class = api_key.team, api_key.data_class
    else:
        teams = list(request.user.teams.all()) if request.user.is_authenticated else []
        if len(teams) > 1:
            names = ", ".join(t.name for t in teams)
            raise PermissionDenied(f"You belong to several teams ({names}), so it is not clear whose residency "
                                   "policy applies; use an API key of one team.", code="ambiguous_team")
        team = teams[0] if teams else None
        key_class = DataClass.objects.get(name="internal")
    if requested_class is None:
        requested_class = request.headers.get(HEADER)
    return Subject(team=team, data_class=data_class_raise(key_class=key_class, requested=requested_class,
                                                          param=param), key_class=key_class)


# -- the decision -----------------------------------------------------------------------------

def policy_for(*, team, data_class: DataClass) -> Policy | None:
    policies = Policy.objects.select_related("team", "data_class").prefetch_related("processing_sites",
                                                                                     "storage_sites")
    return policies.filter(team=team, data_class=data_class).first()


def _jurisdictions(values) -> set[str]:
    return {str(v).strip().casefold() for v in values if str(v).strip()} - {UNSPECIFIED}


def site_allowed(*, site: Site, sites, jurisdictions) -> bool:
    """A site is allowed when named, or when its (specified) jurisdiction is listed."""
    if site.pk in {s.pk for s in sites}:
        return True
    return site.jurisdiction.casefold() != UNSPECIFIED and site.jurisdiction.casefold() in _jurisdictions(
        jurisdictions)


def processing_allowed(policy: Policy, site: Site) -> bool:
    return site_allowed(site=site, sites=policy.processing_sites.all(), jurisdictions=policy.processing_jurisdictions)


def storage_sites(policy: Policy) -> list[Site]:
    """The sites where this policy lets the data be stored."""
    return [site for site in Site.objects.all()
            if site_allowed(site=site, sites=policy.storage_sites.all(), jurisdictions=policy.storage_jurisdictions)]


def storage_site_for(*, team, data_class: DataClass) -> Site:
    """Where a file of `team` in `data_class` is to be stored: the first site (by name) that the
    policy allows for storage and that has a storage path. Raises ResidencyDenied saying why when
    there is none; the caller (an upload) audits the refusal with its own action."""
    who = f"team '{team.name}'" if team is not None else "keys without a team"
    policy = policy_for(team=team, data_class=data_class)
    if policy is None:
        raise ResidencyDenied(f"No residency policy covers {who} and data class '{data_class.name}', so such "
                              "data may not be stored anywhere.")
    allowed = storage_sites(policy)
    usable = [site for site in allowed if site.storage_path]
    if not usable:
        where = _where(list(policy.storage_sites.all()), policy.storage_jurisdictions)
        missing = f", and none of those sites ({', '.join(s.name for s in allowed)}) has a storage path" if allowed else ""
        raise ResidencyDenied(f"Policy #{policy.pk} ({who}, data class '{data_class.name}') allows storage only "
                              f"at {where}{missing}.")
    return usable[0]


def _where(sites, jurisdictions) -> str:
    parts = []
    if sites:
        parts.append("sites " + ", ".join(f"'{s.name}'" for s in sites))
    if _jurisdictions(jurisdictions):
        parts.append("jurisdictions " + ", ".join(sorted(str(j).strip() for j in jurisdictions if str(j).strip())))
    return " or ".join(parts) or "nowhere"


def _pool_place(pool) -> dict:
    return {"pool": pool.name, "site": pool.site.name, "jurisdiction": pool.site.jurisdiction}


@dataclass
class Decision:
    """Where a request may run: the allowed pools serving the model, the chosen one, and why."""

    allowed: bool
    reason: str
    purpose: str
    team: object | None
    data_class: DataClass
    model: object
    policy: Policy | None = None
    pools: list = field(default_factory=list)
    pool: object | None = None
    deployed_at: list[dict] = field(default_factory=list)

    @property
    def prompt_retention(self) -> str:
        return self.policy.prompt_retention if self.policy else Policy.Retention.NONE

    def details(self) -> dict:
        """The decision as the audit log keeps it."""
        policy = self.policy
        return {
            "allowed": self.allowed, "reason": self.reason, "purpose": self.purpose,
            "team": self.team.name if self.team is not None else None, "data_class": self.data_class.name,
            "model": self.model.name, "policy": policy.pk if policy else None,
            "allowed_sites": sorted(s.name for s in policy.processing_sites.all()) if policy else [],
            "allowed_jurisdictions": sorted(policy.processing_jurisdictions) if policy else [],
            "deployed_at": self.deployed_at,
            "allowed_pools": [p.name for p in self.pools],
            "pool": self.pool.name if self.pool else None,
            "site": self.pool.site.name if self.pool else None,
            "jurisdiction": self.pool.site.jurisdiction if self.pool else None,
            "prompt_retention": policy.prompt_retention if policy else None,
        }


def decide(*, team, data_class: DataClass, model, purpose: str = "inference", deployments=None) -> Decision:
    """May `team` send `data_class` data to `model` for `purpose`, and on which pools?

    Deny by default: without a policy for (team, data class) nothing is allowed. With one, the
    allowed pools are the active deployments of the model whose pool's site the policy allows for
    processing; the chosen pool is the first of them with a live worker (else the first).
    `deployments`: the model's active deployments with their pools' sites, when the caller has
    just read them (job_submit), so that a request does not read them twice.
    """
    from citadel.registry.selectors import deployments_active_for_model, workers_live

    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES)}.", param="purpose")
    if deployments is None:
        deployments = list(deployments_active_for_model(model=model).select_related("pool__site"))
    deployed_at = [_pool_place(d.pool) for d in deployments]
    decision = Decision(allowed=False, reason="", purpose=purpose, team=team, data_class=data_class, model=model,
                        deployed_at=deployed_at)
    who = f"team '{team.name}'" if team is not None else "keys without a team"
    policy = policy_for(team=team, data_class=data_class)
    if policy is None:
        decision.reason = (f"No residency policy covers {who} and data class '{data_class.name}', and what no "
                           "policy allows is denied. An administrator can add one (POST /api/v1/residency/policies/).")
        return decision
    decision.policy = policy
    if purpose == "fine_tuning" and not policy.fine_tuning_allowed:
        decision.reason = f"Policy #{policy.pk} ({who}, '{data_class.name}') does not allow fine-tuning on this data."
        return decision
    where = _where(list(policy.processing_sites.all()), policy.processing_jurisdictions)
    if not deployments:
        decision.reason = f"Model '{model.name}' is not deployed on any worker pool."
        return decision
    decision.pools = [d.pool for d in deployments if processing_allowed(policy, d.pool.site)]
    if not decision.pools:
        placed = ", ".join(f"pool '{p['pool']}' at site '{p['site']}' ({p['jurisdiction']})" for p in deployed_at)
        decision.reason = (f"Policy #{policy.pk} ({who}, data class '{data_class.name}') allows processing only at "
                           f"{where}, but model '{model.name}' is deployed only on {placed}. Deploy it at an "
                           "allowed site, or ask an administrator to change the policy.")
        return decision
    live = [pool for pool in decision.pools if workers_live(pool=pool).exists()]
    decision.pool = (live or decision.pools)[0]
    decision.allowed = True
    decision.reason = (f"Policy #{policy.pk} ({who}, data class '{data_class.name}') allows processing at {where}; "
                       f"pool '{decision.pool.name}' at site '{decision.pool.site.name}' "
                       f"({decision.pool.site.jurisdiction}) serves '{model.name}'.")
    return decision


def deployment_check(*, model, pool) -> list[str]:
    """Why `model` may not be placed on `pool`, one line per team and data class; empty if it may.

    The rule: every team listed in Model.teams must be allowed to process, at the pool's site,
    every data class of that team's active API keys (their policy for the class allows the site).
    """
    problems = []
    for team in model.teams.all():
        classes = DataClass.objects.filter(api_keys__team=team, api_keys__revoked_at__isnull=True).distinct()
        for data_class in classes:
            policy = policy_for(team=team, data_class=data_class)
            if policy is None:
                problems.append(f"team '{team.name}' has no policy for its '{data_class.name}' keys")
            elif not processing_allowed(policy, pool.site):
                where = _where(list(policy.processing_sites.all()), policy.processing_jurisdictions)
                problems.append(f"team '{team.name}' may process '{data_class.name}' data only at {where} "
                                f"(policy #{policy.pk})")
    return problems


def deployment_refusal(*, model, pool) -> ResidencyDenied | None:
    problems = deployment_check(model=model, pool=pool)
    if not problems:
        return None
    return ResidencyDenied(f"Model '{model.name}' cannot be deployed on pool '{pool.name}' at site "
                           f"'{pool.site.name}' ({pool.site.jurisdiction}): " + "; ".join(problems) + ".")


# -- sites ------------------------------------------------------------------------------------

def site_snapshot(site: Site) -> dict:
    return {"name": site.name, "region": site.region, "jurisdiction": site.jurisdiction,
            "storage_path": site.storage_path, "description": site.description}


def _clean_jurisdiction(value: str) -> str:
    value = (value or "").strip()
    if not value:
        raise InvalidRequest("jurisdiction must not be empty; use 'unspecified' when it is unknown.",
                             param="jurisdiction")
    return UNSPECIFIED if value.casefold() == UNSPECIFIED else value


@transaction.atomic
def site_create(*, name: str, actor: Actor, region: str = "", jurisdiction: str = UNSPECIFIED,
                storage_path: str = "", description: str = "", request=None) -> Site:
    name = (name or "").strip()
    if not name:
        raise InvalidRequest("name must not be empty.", param="name")
    if Site.objects.filter(name=name).exists():
        raise Conflict(f"A site named '{name}' already exists.", param="name")
    site = Site.objects.create(name=name, region=region, jurisdiction=_clean_jurisdiction(jurisdiction),
                               storage_path=storage_path, description=description)
    audit_record(actor=actor, action="residency.site.create", outcome="success", target_type="site",
                 target_id=name, request=request, details={"before": None, "after": site_snapshot(site)})
    return site


def site_get_or_create(*, name: str, actor: Actor, request=None) -> Site:
    """The site called `name`; an unknown name makes a site of unspecified jurisdiction, which
    only a policy naming it will allow."""
    site = Site.objects.filter(name=(name or "").strip()).first()
    return site or site_create(name=name, actor=actor, request=request)


@transaction.atomic
def site_update(*, site: Site, actor: Actor, request=None, **changes) -> Site:
    site = Site.objects.select_for_update().get(pk=site.pk)
    before = site_snapshot(site)
    if "jurisdiction" in changes:
        changes["jurisdiction"] = _clean_jurisdiction(changes["jurisdiction"])
    if "name" in changes and Site.objects.exclude(pk=site.pk).filter(name=changes["name"]).exists():
        raise Conflict(f"A site named '{changes['name']}' already exists.", param="name")
    for key, value in changes.items():
        setattr(site, key, value)
    site.save()
    audit_record(actor=actor, action="residency.site.update", outcome="success", target_type="site",
                 target_id=site.name, request=request, details={"before": before, "after": site_snapshot(site)})
    return site


@transaction.atomic
def site_delete(*, site: Site, actor: Actor, request=None) -> None:
    if site.pools.exists():
        raise Conflict(f"Site '{site.name}' still has worker pools ({', '.join(p.name for p in site.pools.all())}).")
    before = site_snapshot(site)
    site.delete()
    audit_record(actor=actor, action="residency.site.delete", outcome="success", target_type="site",
                 target_id=before["name"], request=request, details={"before": before, "after": None})


# -- data classes -----------------------------------------------------------------------------

def data_class_snapshot(data_class: DataClass) -> dict:
    return {"name": data_class.name, "rank": data_class.rank, "description": data_class.description,
            "builtin": data_class.builtin, "audit_retention_days": data_class.audit_retention_days}


def _check_days(value, *, param: str, least: int) -> None:
    if value is not None and not least <= value <= RETENTION_DAYS_MAX:
        raise InvalidRequest(f"{param} must be a number of days from {least} to {RETENTION_DAYS_MAX}, or empty.",
                             param=param)


def _normal_name(name) -> str:
    return (name or "").strip().lower()


def _data_class_name_free(name, *, renaming: DataClass | None = None) -> str:
    """`name` as data classes are stored (trimmed, lower-case); Conflict if another class has it."""
    name = _normal_name(name)
    taken = DataClass.objects.filter(name=name)
    if renaming is not None:
        taken = taken.exclude(pk=renaming.pk)
    if taken.exists():
        raise Conflict(f"A data class named '{name}' already exists.", param="name")
    return name


@transaction.atomic
def data_class_create(*, name: str, rank: int, actor: Actor, description: str = "",
                      audit_retention_days: int | None = None, request=None) -> DataClass:
    name = _data_class_name_free(name)
    _check_days(audit_retention_days, param="audit_retention_days", least=0)  # 0: forever
    data_class = DataClass.objects.create(name=name, rank=rank, description=description,
                                          audit_retention_days=audit_retention_days)
    audit_record(actor=actor, action="residency.data_class.create", outcome="success", target_type="data_class",
                 target_id=name, request=request, details={"before": None, "after": data_class_snapshot(data_class)})
    return data_class


@transaction.atomic
def data_class_update(*, data_class: DataClass, actor: Actor, request=None, **changes) -> DataClass:
    data_class = DataClass.objects.select_for_update().get(pk=data_class.pk)
    if "name" in changes:
        if data_class.builtin and _normal_name(changes["name"]) != data_class.name:
            raise InvalidRequest(f"'{data_class.name}' is a built-in data class and keeps its name.", param="name")
        changes["name"] = _data_class_name_free(changes["name"], renaming=data_class)
    if "audit_retention_days" in changes:
        _check_days(changes["audit_retention_days"], param="audit_retention_days", least=0)
    before = data_class_snapshot(data_class)
    for key, value in changes.items():
        setattr(data_class, key, value)
    data_class.save()
    audit_record(actor=actor, action="residency.data_class.update", outcome="success", target_type="data_class",
                 target_id=data_class.name, request=request,
                 details={"before": before, "after": data_class_snapshot(data_class)})
    return data_class


@transaction.atomic
def data_class_delete(*, data_class: DataClass, actor: Actor, request=None) -> None:
    if data_class.builtin:
        raise InvalidRequest(f"'{data_class.name}' is a built-in data class and cannot be deleted.")
    if data_class.api_keys.exists() or data_class.policies.exists():
        raise Conflict(f"Data class '{data_class.name}' is still used by API keys or policies.")
    before = data_class_snapshot(data_class)
    data_class.delete()
    audit_record(actor=actor, action="residency.data_class.delete", outcome="success", target_type="data_class",
                 target_id=before["name"], request=request, details={"before": before, "after": None})


# -- policies ---------------------------------------------------------------------------------

def policy_snapshot(policy: Policy) -> dict:
    return {
        "id": policy.pk, "team": policy.team.name if policy.team_id else None,
        "data_class": policy.data_class.name,
        "processing_sites": sorted(s.name for s in policy.processing_sites.all()),
        "processing_jurisdictions": list(policy.processing_jurisdictions),
        "storage_sites": sorted(s.name for s in policy.storage_sites.all()),
        "storage_jurisdictions": list(policy.storage_jurisdictions),
        "prompt_retention": policy.prompt_retention, "retention_days": policy.retention_days,
        "fine_tuning_allowed": policy.fine_tuning_allowed, "description": policy.description,
    }


def _clean_policy_fields(fields: dict) -> dict:
    for name in ("processing_jurisdictions", "storage_jurisdictions"):
        if name in fields:
            values = [str(v).strip() for v in fields[name] or [] if str(v).strip()]
            if any(v.casefold() == UNSPECIFIED for v in values):
                raise InvalidRequest(f"{name} cannot list '{UNSPECIFIED}': name such sites instead.", param=name)
            fields[name] = sorted(set(values))
    if "retention_days" in fields:
        _check_days(fields["retention_days"], param="retention_days", least=1)
    if "prompt_retention" in fields and fields["prompt_retention"] not in Policy.Retention.values:
        raise InvalidRequest(f"prompt_retention must be one of {', '.join(Policy.Retention.values)}.",
                             param="prompt_retention")
    return fields


def _set_sites(policy: Policy, fields: dict) -> None:
    for name in ("processing_sites", "storage_sites"):
        if name in fields:
            getattr(policy, name).set(fields[name])


@transaction.atomic
def policy_create(*, data_class: DataClass, actor: Actor, team=None, request=None, **fields) -> Policy:
    if Policy.objects.filter(team=team, data_class=data_class).exists():
        who = f"team '{team.name}'" if team else "keys without a team"
        raise Conflict(f"A policy for {who} and data class '{data_class.name}' already exists; change that one.")
    fields = _clean_policy_fields(fields)
    sites = {name: fields.pop(name) for name in ("processing_sites", "storage_sites") if name in fields}
    policy = Policy.objects.create(team=team, data_class=data_class, **fields)
    _set_sites(policy, sites)
    audit_record(actor=actor, action="residency.policy.create", outcome="success", target_type="policy",
                 target_id=str(policy.pk), request=request, details={"before": None, "after": policy_snapshot(policy)})
    return policy


@transaction.atomic
def policy_update(*, policy: Policy, actor: Actor, request=None, **fields) -> Policy:
    policy = Policy.objects.select_for_update().get(pk=policy.pk)
    before = policy_snapshot(policy)
    fields = _clean_policy_fields(fields)
    sites = {name: fields.pop(name) for name in ("processing_sites", "storage_sites") if name in fields}
    for key, value in fields.items():
        setattr(policy, key, value)
    if Policy.objects.exclude(pk=policy.pk).filter(team=policy.team, data_class=policy.data_class).exists():
        raise Conflict("Another policy already covers this team and data class.")
    policy.save()
    _set_sites(policy, sites)
    audit_record(actor=actor, action="residency.policy.update", outcome="success", target_type="policy",
                 target_id=str(policy.pk), request=request,
                 details={"before": before, "after": policy_snapshot(policy)})
    return policy


@transaction.atomic
def policy_delete(*, policy: Policy, actor: Actor, request=None) -> None:
    before = policy_snapshot(policy)
    policy.delete()
    audit_record(actor=actor, action="residency.policy.delete", outcome="success", target_type="policy",
                 target_id=str(before["id"]), request=request, details={"before": before, "after": None})


def dry_run(*, request, model, requested_class: str | None, purpose: str = "inference") -> dict:
    """Would this request (its key or session, raised to `requested_class`) be allowed for `model`,
    and where would it run and be stored? Decides exactly as dispatch does; dispatches nothing."""
    subject = request_subject(request, requested_class=requested_class,
                              param="data_class" if requested_class else HEADER)
    decision = decide(team=subject.team, data_class=subject.data_class, model=model, purpose=purpose)
    details = decision.details()
    stored = [s.name for s in storage_sites(decision.policy)] if decision.policy else []
    try:
        storage_site = storage_site_for(team=subject.team, data_class=subject.data_class).name
    except ResidencyDenied:
        storage_site = None
    return {
        "allowed": decision.allowed, "pool": details["pool"], "site": details["site"],
        "jurisdiction": details["jurisdiction"], "reason": decision.reason, "team": details["team"],
        "data_class": subject.data_class.name, "policy": details["policy"],
        "allowed_pools": details["allowed_pools"], "storage_sites": stored, "storage_site": storage_site,
        "prompt_retention": details["prompt_retention"],
    }
