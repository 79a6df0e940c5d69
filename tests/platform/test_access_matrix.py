"""The access matrix: every object endpoint of the management API, every role, another team's ids.

Endpoints are found by walking the URL conf, so an endpoint added later is covered the moment it is
registered: an object endpoint (one with an id in its path) whose objects this file cannot make fails
`test_every_object_endpoint_has_an_object_to_try` until a maker is added to OBJECTS below (a few
lines: make the other team's object, return the URL's arguments).

Team objects (keys, jobs, files, fine-tuning jobs, a team's members, quota and policies): for every
role, in the browser session and with an API key, every method on another team's object answers 403
or 404, and the answer carries none of that object's data. Platform objects (models, sites,
deployments): a role changes them only when the view's write_roles name it. An auditor is refused
every unsafe method of every endpoint, on their own team's objects too.
"""

import os
import re
import tempfile
import uuid
from dataclasses import dataclass

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from citadel.accounts.models import Role, Team
from citadel.accounts.permissions import write_roles_of
from citadel.accounts.services import api_key_create, membership_set, team_create
from citadel.audit.services import Actor
from citadel.residency.models import DataClass, Site

pytestmark = pytest.mark.django_db

SECRET = "redsecret"  # in every name and description of the other team's objects; must never come back
SYSTEM = Actor.system("test")
METHODS = ("get", "post", "put", "patch", "delete")
ROLES = list(Role.values)


def _walk(patterns, prefix=""):
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from _walk(entry.url_patterns, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern) and hasattr(entry.callback, "view_class"):
            yield prefix + str(entry.pattern), entry.name, entry.callback.view_class


def management_endpoints():
    """(route, url name, view class) of every DRF view under /api/v1/."""
    return [(route, name, view) for route, name, view in _walk(get_resolver().url_patterns)
            if route.startswith("api/v1/")]


def object_endpoints():
    return [e for e in management_endpoints() if "<" in e[0]]


def methods_of(view) -> list[str]:
    return [m for m in METHODS if hasattr(view, m)]


def fill(route: str, kwargs: dict) -> str:
    def value(match):
        name = match.group(1).split(":")[-1]
        return str(kwargs[name])
    return "/" + re.sub(r"<([^>]+)>", value, route)


@dataclass
class World:
    red: Team
    blue: Team
    users: dict  # role -> blue user with that role
    keys: dict  # role -> that user's key in blue (None for auditors, who hold none)
    admin: object
    red_owner: object
    blue_owner: object


@pytest.fixture
def world(db):
    User = get_user_model()
    red_owner = User.objects.create_user(f"{SECRET}-owner", password="x" * 16)
    blue_owner = User.objects.create_user("blue-owner", password="x" * 16)
    red = team_create(name=f"{SECRET}-team", description=f"{SECRET} description", actor=SYSTEM)
    blue = team_create(name="blue", actor=SYSTEM)
    membership_set(team=red, user=red_owner, role=Role.ADMIN, actor=SYSTEM)
    membership_set(team=blue, user=blue_owner, role=Role.ADMIN, actor=SYSTEM)
    users, keys = {}, {}
    for role in ROLES:
        user = User.objects.create_user(f"blue-{role}", password="x" * 16)
        membership_set(team=blue, user=user, role=role, actor=SYSTEM)
        users[role] = user
        keys[role] = None if role == Role.AUDITOR else api_key_create(user=user, name=f"blue {role}", team=blue,
                                                                      actor=SYSTEM).key
    admin = User.objects.create_user("platform-admin", password="x" * 16, is_staff=True)
    return World(red=red, blue=blue, users=users, keys=keys, admin=admin, red_owner=red_owner,
                 blue_owner=blue_owner)


# -- makers: an object of `team` owned by `owner`; each returns the URL's arguments --------------------------

def _key(world, team, owner):
    return {"prefix": api_key_create(user=owner, name=f"{SECRET} key", team=team, actor=SYSTEM).api_key.prefix}


def _team(world, team, owner):
    return {"name": team.name}


def _member(world, team, owner):
    return {"name": team.name, "username": owner.username}


def _member_totp(world, team, owner):
    from citadel.accounts.models import TotpDevice

    TotpDevice.objects.create(user=owner, secret="JBSWY3DPEHPK3PXP")
    return {"username": owner.username}


def _model(name="m"):
    from citadel.registry.models import Model

    return Model.objects.get_or_create(name=name, defaults={"path": f"/srv/models/{name}"})[0]


def _pool():
    from citadel.registry.models import WorkerPool

    site = Site.objects.get_or_create(name="site-a", defaults={"jurisdiction": "EU"})[0]
    return WorkerPool.objects.get_or_create(name="pool-a", defaults={"site": site})[0]


def _inference_job(world, team, owner):
    from citadel.jobs.models import InferenceJob

    job = InferenceJob.objects.create(kind="chat", model=_model(), user=owner, team=team,
                                      payload={"messages": [{"role": "user", "content": SECRET}]}, text=SECRET)
    return {"job_id": job.id}


def _policy(world, team, owner):
    from citadel.residency.models import Policy

    policy = Policy.objects.create(team=team, data_class=DataClass.objects.get(name="internal"),
                                   description=f"{SECRET} policy")
    return {"pk": policy.pk}


def _finetuning_file(world, team, owner):
    from citadel.finetuning.models import File

    site = _pool().site
    handle, path = tempfile.mkstemp(suffix=".jsonl")
    os.write(handle, SECRET.encode())
    os.close(handle)
    file = File.objects.create(filename=f"{SECRET}.jsonl", bytes=len(SECRET), sha256="0" * 64, site=site, path=path,
                               data_class=DataClass.objects.get(name="internal"), team=team, user=owner)
    return {"file_id": f"file-{file.id.hex}"}


def _finetuning_job(world, team, owner):
    from citadel.finetuning.models import File, FineTuningJob

    file_id = _finetuning_file(world, team, owner)["file_id"]
    job = FineTuningJob.objects.create(model=_model(), training_file=File.objects.get(id=uuid.UUID(file_id[5:])),
                                       suffix=SECRET[:10], seed=1, hyperparameters={}, config={}, team=team,
                                       user=owner, data_class=DataClass.objects.get(name="internal"),
                                       output_dir=f"/nonexistent/{SECRET}")
    return {"job_id": f"ftjob-{job.id.hex}"}


def _batch(world, team, owner):
    from citadel.batches.models import Batch
    from citadel.finetuning.models import File

    file_id = _finetuning_file(world, team, owner)["file_id"]
    batch = Batch.objects.create(endpoint="/v1/chat/completions", input_file=File.objects.get(id=uuid.UUID(file_id[5:])),
                                 metadata={"note": SECRET}, team=team, user=owner,
                                 data_class=DataClass.objects.get(name="internal"))
    return {"batch_id": f"batch_{batch.id.hex}"}


TEAM_OBJECTS = {
    "api-team": _team, "api-team-members": _team, "api-team-quota": _team, "api-team-member": _member,
    "api-key": _key, "api-key-revoke": _key, "api-key-quota": _key,
    "api-job": _inference_job,
    "api-residency-policy": _policy,
    "api-finetuning-file": _finetuning_file, "api-finetuning-file-content": _finetuning_file,
    "api-finetuning-job": _finetuning_job, "api-finetuning-job-cancel": _finetuning_job,
    "api-finetuning-job-events": _finetuning_job, "api-finetuning-job-checkpoints": _finetuning_job,
    "api-finetuning-job-metrics": _finetuning_job,
    "batch": _batch,
    "api-user-totp": _member_totp,
}


def _model_name(world):
    return {"name": _model().name}


def _deployment(world):
    from citadel.registry.models import Deployment

    return {"pk": Deployment.objects.create(model=_model(), pool=_pool()).pk}


def _site(world):
    return {"name": _pool().site.name}


def _data_class(world):
    DataClass.objects.get_or_create(name="pci", defaults={"rank": 35})
    return {"name": "pci"}


def _group_mapping(world):
    from citadel.sso.models import GroupMapping

    return {"pk": GroupMapping.objects.create(group="g", team=world.blue, role=Role.AUDITOR).pk}


PLATFORM_OBJECTS = {
    "api-model-teams": _model_name, "api-deployment-retire": _deployment,
    "api-residency-site": _site, "api-residency-data-class": _data_class,
    "api-sso-group-mapping": _group_mapping,
}


OWN_SECOND_FACTOR = {"api-me-totp", "api-me-totp-confirm"}
ORGANISATION_WIDE = {"api-audit-records", "api-residency-ropa"}
"""Reports over every team, for platform administrators and auditors only (their read_roles)."""


def openai_object_endpoints():
    """(route, url name, view class) of every /v1 endpoint with an id in its path."""
    return [(route, name, view) for route, name, view in _walk(get_resolver().url_patterns)
            if route.startswith("v1/") and "<" in route]


OPENAI_TEAM_OBJECTS = {
    "openai-file": _finetuning_file, "openai-file-content": _finetuning_file,
    "openai-fine-tuning-job": _finetuning_job, "openai-fine-tuning-job-cancel": _finetuning_job,
    "openai-fine-tuning-job-events": _finetuning_job, "openai-fine-tuning-job-checkpoints": _finetuning_job,
    "openai-batch": _batch, "openai-batch-cancel": _batch,
}
OPENAI_PLATFORM_OBJECTS = {"openai-model"}  # models are shared; a key's allowed_models narrow them


def test_every_openai_object_endpoint_has_an_object_to_try():
    missing = [f"/{route} ({name})" for route, name, _ in openai_object_endpoints()
               if name not in OPENAI_TEAM_OBJECTS and name not in OPENAI_PLATFORM_OBJECTS]
    assert not missing, f"Add a maker to OPENAI_TEAM_OBJECTS in {__file__}: {missing}"


@pytest.mark.parametrize("route,name,view", [e for e in openai_object_endpoints() if e[1] in OPENAI_TEAM_OBJECTS],
                         ids=lambda value: value if isinstance(value, str) and value.startswith("openai-") else "")
def test_another_teams_object_under_v1_is_refused_to_every_key_and_leaks_nothing(world, route, name, view):
    kwargs = OPENAI_TEAM_OBJECTS[name](world, world.red, world.red_owner)
    url = fill(route, kwargs)
    for role in ROLES:
        if not world.keys[role]:
            continue
        client = Client(HTTP_AUTHORIZATION=f"Bearer {world.keys[role]}")
        for method in methods_of(view):
            response = _call(client, method, url)
            assert response.status_code in (403, 404), (role, method, url, response.status_code,
                                                        response.content[:300])
            assert SECRET not in _without(response.content.decode(errors="replace"), kwargs), (role, method, url)
    red_key = api_key_create(user=world.red_owner, name="red", team=world.red, actor=SYSTEM).key
    if "get" in methods_of(view):  # the ids are real: the owning team's key reads the object
        response = Client(HTTP_AUTHORIZATION=f"Bearer {red_key}").get(url)
        assert response.status_code == 200, (url, response.status_code, response.content[:300])


def test_every_object_endpoint_has_an_object_to_try():
    missing = [f"/{route} ({name})" for route, name, _ in object_endpoints()
               if name not in TEAM_OBJECTS and name not in PLATFORM_OBJECTS]
    assert not missing, ("Object endpoints the access matrix cannot try; add a maker to TEAM_OBJECTS or "
                         f"PLATFORM_OBJECTS in {__file__}: {missing}")


def _without(text: str, kwargs: dict) -> str:
    """The answer less the caller's own URL arguments (an error may repeat what was asked: no leak)."""
    for value in kwargs.values():
        text = text.replace(str(value), "")
    return text


def _clients(world, role):
    session = Client()
    session.force_login(world.users[role])
    clients = [("session", session)]
    if world.keys[role]:
        clients.append(("key", Client(HTTP_AUTHORIZATION=f"Bearer {world.keys[role]}")))
    return clients


def _call(client, method, url):
    if method == "get":
        return client.get(url)
    return getattr(client, method)(url, data={}, content_type="application/json")


@pytest.mark.parametrize("route,name,view", [e for e in object_endpoints() if e[1] in TEAM_OBJECTS],
                         ids=lambda value: value if isinstance(value, str) and value.startswith("api-") else "")
def test_another_teams_object_is_refused_to_every_role_and_leaks_nothing(world, route, name, view):
    kwargs = TEAM_OBJECTS[name](world, world.red, world.red_owner)
    url = fill(route, kwargs)
    for role in ROLES:
        for how, client in _clients(world, role):
            for method in methods_of(view):
                response = _call(client, method, url)
                assert response.status_code in (403, 404), (role, how, method, url, response.status_code,
                                                            response.content[:300])
                assert SECRET not in _without(response.content.decode(errors="replace"), kwargs), \
                    (role, how, method, url, response.content[:300])
    # The ids are real: a platform administrator reads the same object.
    if "get" in methods_of(view):
        admin = Client()
        admin.force_login(world.admin)
        response = admin.get(url)
        assert response.status_code == 200, (url, response.status_code, response.content[:300])


@pytest.mark.parametrize("route,name,view", [e for e in object_endpoints() if e[1] in PLATFORM_OBJECTS],
                         ids=lambda value: value if isinstance(value, str) and value.startswith("api-") else "")
def test_platform_objects_are_changed_only_by_the_roles_their_view_names(world, route, name, view):
    url = fill(route, PLATFORM_OBJECTS[name](world))
    for role in ROLES:
        for method in methods_of(view):
            if method == "get":
                continue
            allowed = role in write_roles_of(view, url) and role != Role.AUDITOR
            if allowed:
                continue  # may succeed; what it does is that endpoint's own tests' business
            for how, client in _clients(world, role):
                response = _call(client, method, url)
                assert response.status_code == 403, (role, how, method, url, response.status_code)


@pytest.mark.parametrize("route,name,view", management_endpoints(),
                         ids=lambda value: value if isinstance(value, str) and value.startswith("api-") else "")
def test_an_auditor_cannot_change_anything(world, route, name, view):
    from citadel.audit.models import AuditRecord

    unsafe = [m for m in methods_of(view) if m != "get"]
    if not unsafe:
        pytest.skip("read-only endpoint")
    if name in OWN_SECOND_FACTOR:
        pytest.skip("enrolling one's own second factor is open to every role")
    kwargs = {}
    if name in TEAM_OBJECTS:
        kwargs = TEAM_OBJECTS[name](world, world.blue, world.blue_owner)  # the auditor's own team's object
    elif name in PLATFORM_OBJECTS:
        kwargs = PLATFORM_OBJECTS[name](world)
    url = fill(route, kwargs)
    auditor = Client()
    auditor.force_login(world.users[Role.AUDITOR])
    before = AuditRecord.objects.filter(outcome="success").count()
    for method in unsafe:
        response = _call(auditor, method, url)
        assert response.status_code == 403, (method, url, response.status_code, response.content[:300])
    assert AuditRecord.objects.filter(outcome="success").count() == before


def test_an_auditor_reads_their_teams_policies_and_the_audit_trail_but_not_other_teams_keys(world):
    auditor = Client()
    auditor.force_login(world.users[Role.AUDITOR])
    assert auditor.get("/api/v1/residency/policies/").status_code == 200
    assert auditor.get("/api/v1/audit/records/").status_code == 200
    keys = auditor.get("/api/v1/keys/").json()
    assert {k["team"] for k in keys} <= {"blue"}


@pytest.mark.parametrize("role", ROLES)
def test_lists_show_a_role_only_its_teams_objects(world, role):
    _key(world, world.red, world.red_owner)
    _inference_job(world, world.red, world.red_owner)
    _policy(world, world.red, world.red_owner)
    for how, client in _clients(world, role):
        for route, name, view in management_endpoints():
            if "<" in route or "get" not in methods_of(view):
                continue
            if role == Role.AUDITOR and name in ORGANISATION_WIDE:
                continue  # auditors read these for every team: that is their job
            response = client.get("/" + route)
            assert SECRET.encode() not in response.content, (role, how, route)


def test_a_key_is_refused_endpoints_outside_its_scopes(world):
    key = api_key_create(user=world.users[Role.ML_ENGINEER], name="inference only", team=world.blue,
                         scopes=["inference"], actor=SYSTEM).key
    client = Client(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get("/v1/models").status_code == 200
    refused = client.get("/api/v1/keys/")
    assert refused.status_code == 403 and refused.json()["code"] == "insufficient_scope"
    files = client.get("/v1/files")
    assert files.status_code == 403 and files.json()["error"]["code"] == "insufficient_scope"


def test_a_key_limited_to_some_models_cannot_use_others(world):
    from citadel.registry.models import Deployment

    Deployment.objects.create(model=_model("allowed"), pool=_pool(), status="active")
    Deployment.objects.create(model=_model("other"), pool=_pool(), status="active")
    key = api_key_create(user=world.users[Role.APPLICATION], name="one model", team=world.blue,
                         allowed_models=["allowed"], actor=SYSTEM).key
    client = Client(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["allowed"]
    assert client.get("/v1/models/other").status_code == 404
    refused = client.post("/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "x"}]},
                          content_type="application/json")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"


def test_a_team_admin_manages_members_and_an_ml_engineer_cannot(world):
    from citadel.audit.models import AuditRecord

    admin = Client()
    admin.force_login(world.blue_owner)
    newcomer = get_user_model().objects.create_user("newcomer", password="x" * 16)
    response = admin.post("/api/v1/teams/blue/members/", {"user": "newcomer", "role": "application"},
                          content_type="application/json")
    assert response.status_code == 201 and response.json()["role"] == "application"
    assert admin.patch("/api/v1/teams/blue/members/newcomer/", {"role": "ml_engineer"},
                       content_type="application/json").json()["role"] == "ml_engineer"
    engineer = Client()
    engineer.force_login(world.users[Role.ML_ENGINEER])
    assert engineer.delete("/api/v1/teams/blue/members/newcomer/").status_code == 403
    assert admin.delete("/api/v1/teams/blue/members/newcomer/").status_code == 204
    assert not newcomer.memberships.exists()
    actions = list(AuditRecord.objects.filter(target_id="blue", action__startswith="team.member")
                   .values_list("action", flat=True))
    assert actions.count("team.member.set") >= 2 and "team.member.remove" in actions


def test_an_operator_manages_deployments_and_an_ml_engineer_cannot(world):
    operator, engineer = Client(), Client()
    operator.force_login(world.users[Role.OPERATOR])
    engineer.force_login(world.users[Role.ML_ENGINEER])
    _model()
    assert engineer.post("/api/v1/pools/", {"name": "gpu-x"}, content_type="application/json").status_code == 403
    assert operator.post("/api/v1/pools/", {"name": "gpu-x"}, content_type="application/json").status_code == 201


def test_an_auditor_changes_nothing_in_the_console_either(world):
    """Every console route (found in the URL conf, so later pages are covered too) refuses an
    auditor's POST, except signing in and out and their own password and sessions."""
    auditor = Client()
    auditor.force_login(world.users[Role.AUDITOR])
    console = [route for route, *_ in _walk_all(get_resolver().url_patterns)
               if not route.startswith(("api/", "v1/", "admin/", "sso/", "login/", "logout/", "account/totp/",
                                        "account/password/", "account/sessions/",
                                        "static/", "healthz", "readyz", "metrics"))]
    assert "playground/stream" in console and "account/" in console
    for route in console:
        url = "/" + re.sub(r"<[^>]+>", "x", route)
        response = auditor.post(url, {"name": "k"})
        assert response.status_code == 403, (url, response.status_code)


def _walk_all(patterns, prefix=""):
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from _walk_all(entry.url_patterns, prefix + str(entry.pattern))
        else:
            yield prefix + str(entry.pattern), entry.name


@pytest.mark.parametrize("role", [Role.OPERATOR, Role.AUDITOR])
def test_a_team_admin_cannot_grant_roles_that_reach_beyond_the_team(world, role):
    get_user_model().objects.create_user("newcomer", password="x" * 16)
    lead = Client()
    lead.force_login(world.blue_owner)
    refused = lead.post("/api/v1/teams/blue/members/", {"user": "newcomer", "role": role},
                        content_type="application/json")
    assert refused.status_code == 403
    assert lead.patch(f"/api/v1/teams/blue/members/blue-{role}/", {"role": "ml_engineer"},
                      content_type="application/json").status_code == 403
    root = Client()
    root.force_login(world.admin)
    assert root.post("/api/v1/teams/blue/members/", {"user": "newcomer", "role": role},
                     content_type="application/json").status_code == 201


def test_a_key_cannot_create_or_widen_a_key_beyond_itself(world):
    narrow = api_key_create(user=world.users[Role.ML_ENGINEER], name="narrow", team=world.blue,
                            scopes=["management", "inference"], actor=SYSTEM, expires_in_days=7)
    client = Client(HTTP_AUTHORIZATION=f"Bearer {narrow.key}")
    wider = client.post("/api/v1/keys/", {"name": "wide", "team": "blue", "scopes": ["files"], "expires_in_days": 1},
                        content_type="application/json")
    assert wider.status_code == 403 and wider.json()["code"] == "insufficient_scope"
    forever = client.post("/api/v1/keys/", {"name": "forever", "team": "blue"}, content_type="application/json")
    assert forever.status_code == 403
    ok = client.post("/api/v1/keys/", {"name": "ok", "team": "blue", "expires_in_days": 1},
                     content_type="application/json")
    assert ok.status_code == 201 and ok.json()["scopes"] == ["management", "inference"]
    widen = client.patch(f"/api/v1/keys/{ok.json()['prefix']}/", {"scopes": ["management", "fine_tuning"]},
                         content_type="application/json")
    assert widen.status_code == 403
