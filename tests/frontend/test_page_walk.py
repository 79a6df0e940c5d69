"""Every console page, every role: no page answers 500, a page the role may not use answers 403
(anonymous visitors are sent to sign in), and every link in a role's menu answers 200 for it.

Pages are found by walking frontend/urls.py, so a page added later is covered at once: one with a
parameter in its path needs a maker in MAKERS below (a line that makes the object in the walkers' team
and returns the URL's arguments), or `test_every_console_page_with_a_parameter_has_a_maker` names it.
ACCESS says who may use each page (the roles its view lets in); platform administrators use them all.
"""

import re
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from citadel.accounts import permissions as perms
from citadel.accounts.models import Team
from citadel.accounts.services import api_key_create, membership_set
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor, audit_record
from citadel.jobs.models import InferenceJob
from citadel.registry.models import ModelImport
from citadel.registry.services import deployment_create, model_register, pool_create
from citadel.residency.models import DataClass
from citadel.residency.services import policy_create, site_create
from frontend.nav import menu_for

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("test")
ROLES = ("admin", "operator", "ml_engineer", "auditor", "application")
ANY = None
PLATFORM_ADMINS = frozenset()

# Pages open to everyone, signed in or not (the sign-in steps themselves).
PUBLIC = {"login", "login-totp", "logout"}
# Who may use each page: ANY signed-in user, or the roles its view lets in (platform administrators pass).
ACCESS = {
    "home": ANY, "account": ANY, "account-totp": ANY, "account-password": ANY, "account-sessions": ANY,
    "teams": ANY, "users": PLATFORM_ADMINS, "keys": ANY, "team": ANY, "key-quota": ANY,
    "identity-sso-mappings": perms.OVERSIGHT_ROLES, "identity-login-locks": PLATFORM_ADMINS,
    "dashboard": ANY, "models": ANY, "model": ANY, "model-import-start": perms.REGISTRY_ROLES,
    "model-import": perms.REGISTRY_ROLES, "model-deploy": perms.REGISTRY_ROLES,
    "deployment-undeploy": perms.REGISTRY_ROLES, "deployment-live": ANY,
    "deployment-settings": perms.REGISTRY_ROLES,
    "playground": perms.WRITE_ROLES, "playground-stream": perms.WRITE_ROLES, "playground-job": perms.WRITE_ROLES,
    "residency": ANY, "finetuning": ANY, "finetuning-datasets": ANY, "finetuning-upload": perms.USE_ROLES,
    "finetuning-job-new": perms.USE_ROLES, "finetuning-job": ANY, "finetuning-job-live": ANY,
    "finetuning-job-cancel": perms.USE_ROLES, "usage": ANY, "usage-export": ANY,
    "audit": perms.OVERSIGHT_ROLES, "audit-record": perms.OVERSIGHT_ROLES, "audit-verify": perms.OVERSIGHT_ROLES,
    "audit-export": perms.OVERSIGHT_ROLES, "residency-admin": perms.OVERSIGHT_ROLES,
    "residency-policy-new": PLATFORM_ADMINS, "residency-policy-edit": PLATFORM_ADMINS,
    "residency-policy-delete": PLATFORM_ADMINS, "residency-site-new": PLATFORM_ADMINS,
    "residency-site-edit": PLATFORM_ADMINS, "residency-site-delete": PLATFORM_ADMINS,
    "residency-data-class-new": PLATFORM_ADMINS, "residency-data-class-edit": PLATFORM_ADMINS,
    "residency-data-class-delete": PLATFORM_ADMINS,
}
# What a permitted request may answer besides 200: a redirect (home; a form posted back to its page),
# 400 for the empty form the walk posts to a POST-only page, or 404 for an object that form names.
PERMITTED = {200, 302, 400, 404}
# Endpoints the page's script calls (JSON, not a page): anonymous callers get 401/403, not a redirect.
SCRIPT_ENDPOINTS = {"playground-stream"}


def visit(client, url: str):
    """GET the page; a POST-only page (405) is posted to instead, with an empty form."""
    response = client.get(url)
    if response.status_code == 405:
        response = client.post(url, {})
    return response


def console_pages():
    """(route, url name) of every page in frontend/urls.py."""
    def walk(patterns, prefix=""):
        for entry in patterns:
            if isinstance(entry, URLResolver):
                yield from walk(entry.url_patterns, prefix + str(entry.pattern))
            elif isinstance(entry, URLPattern):
                yield prefix + str(entry.pattern), entry.name

    return [(route, name) for route, name in walk(get_resolver().url_patterns)
            if not route.startswith(("admin/", "api/", "v1/", "sso/", "healthz", "readyz", "metrics"))]


def _ft_job(world):
    from citadel.finetuning.models import File, FineTuningJob

    data = File.objects.create(filename="t.jsonl", bytes=1, sha256="0" * 64, site=world.site, path="t.jsonl",
                               data_class=world.internal, team=world.team, user=world.users["ml_engineer"])
    job = FineTuningJob.objects.create(model=world.model, training_file=data, hyperparameters={}, config={},
                                       data_class=world.internal, team=world.team, seed=1,
                                       user=world.users["ml_engineer"])
    return {"job_id": job.openai_id}


MAKERS = {
    "team": lambda w: {"name": w.team.name},
    "key-quota": lambda w: {"prefix": w.key.prefix},
    "model": lambda w: {"name": w.model.name},
    "model-deploy": lambda w: {"name": w.model.name},
    "model-import": lambda w: {"pk": ModelImport.objects.create(name="imported", path="/models/x",
                                                                pool=w.pool).pk},
    "deployment-undeploy": lambda w: {"pk": w.deployment.pk},
    "deployment-live": lambda w: {"pk": w.deployment.pk},
    "deployment-settings": lambda w: {"pk": w.deployment.pk},
    "playground-job": lambda w: {"job_id": w.inference_job.pk},
    "finetuning-job": _ft_job, "finetuning-job-live": _ft_job, "finetuning-job-cancel": _ft_job,
    "audit-record": lambda w: {"sequence": AuditRecord.objects.order_by("sequence").first().sequence},
    "residency-policy-edit": lambda w: {"pk": w.policy.pk},
    "residency-policy-delete": lambda w: {"pk": w.policy.pk},
    "residency-site-edit": lambda w: {"pk": w.site.pk},
    "residency-site-delete": lambda w: {"pk": w.site.pk},
    "residency-data-class-edit": lambda w: {"pk": w.internal.pk},
    "residency-data-class-delete": lambda w: {"pk": w.internal.pk},
}


def fill(route: str, kwargs: dict) -> str:
    return "/" + re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda match: str(kwargs[match.group(1)]), route)


@pytest.fixture
def world(tmp_path):
    User = get_user_model()
    team = Team.objects.create(name="walkers")
    users = {}
    for role in ROLES:
        users[role] = User.objects.create_user(f"walk-{role}", password="x" * 16)
        membership_set(team=team, user=users[role], role=role, actor=SYSTEM)
    users["platform_admin"] = User.objects.create_user("walk-root", password="x" * 16, is_staff=True)
    site = site_create(name="walk-site", jurisdiction="EU", storage_path=str(tmp_path), actor=SYSTEM)
    model = model_register(name="walk-model", path=str(tmp_path / "on-the-workers"), actor=SYSTEM)
    pool = pool_create(name="walk-pool", site=site, actor=SYSTEM)
    deployment = deployment_create(model=model, pool=pool, actor=SYSTEM)
    internal = DataClass.objects.get(name="internal")
    policy = policy_create(team=team, data_class=internal, processing_sites=[site], storage_sites=[site],
                           actor=SYSTEM)
    key = api_key_create(user=users["ml_engineer"], name="walk-key", team=team, actor=SYSTEM).api_key
    audit_record(actor=SYSTEM, action="test.walk", outcome="success")
    world = SimpleNamespace(team=team, users=users, site=site, model=model, pool=pool, deployment=deployment,
                            internal=internal, policy=policy, key=key)
    for role in ROLES:  # each user's own playground request (a job is shown only to whoever made it)
        job = InferenceJob.objects.create(kind="chat", model=model, pool=pool, site=site, user=users[role],
                                          team=team, payload={}, status="succeeded")
        setattr(world, f"job_{role}", job)
    world.inference_job = world.job_ml_engineer
    return world


def urls_for(world) -> dict[str, str]:
    urls = {}
    for route, name in console_pages():
        kwargs = MAKERS[name](world) if name in MAKERS else {}
        urls[name] = fill(route, kwargs)
    return urls


def test_every_console_page_with_a_parameter_has_a_maker_and_an_access_rule():
    pages = console_pages()
    assert not [name for route, name in pages if "<" in route and name not in MAKERS], "add a maker to MAKERS"
    assert not [name for _, name in pages if name not in ACCESS and name not in PUBLIC], "add the page to ACCESS"


def may_use(user, name: str) -> bool:
    roles = ACCESS[name]
    return roles is ANY or perms.has_role(user, roles)


@pytest.mark.parametrize("who", [*ROLES, "platform_admin"])
def test_no_page_answers_500_and_a_page_the_role_may_not_use_answers_403(world, who):
    user = world.users[who]
    client = Client(raise_request_exception=False)
    client.force_login(user)
    urls = urls_for(world)
    if who in ROLES:  # the job in the path is this user's own
        urls["playground-job"] = f"/playground/jobs/{getattr(world, f'job_{who}').pk}/"
    wrong = []
    for name, url in urls.items():
        if name in PUBLIC or name not in ACCESS:
            continue
        status = visit(client, url).status_code
        expected = PERMITTED if may_use(user, name) else {403}
        if status not in expected:
            wrong.append(f"{name} {url}: {status}, expected {sorted(expected)}")
    assert not wrong, f"{who}:\n" + "\n".join(wrong)


def test_anonymous_visitors_are_sent_to_sign_in_from_every_page_and_never_get_a_500(world):
    client = Client(raise_request_exception=False)
    wrong = []
    for name, url in urls_for(world).items():
        response = visit(client, url)
        if name in PUBLIC:
            ok = response.status_code in (200, 302)
        elif name in SCRIPT_ENDPOINTS:
            ok = response.status_code in (401, 403)
        else:
            if response.status_code == 302 and not response["Location"].startswith("/login/"):
                response = client.get(response["Location"])  # e.g. home, which sends everyone on
            ok = response.status_code == 302 and response["Location"].startswith("/login/")
        if not ok:
            wrong.append(f"{name} {url}: {response.status_code} {response.get('Location', '')}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("who", [*ROLES, "platform_admin"])
def test_every_link_in_a_roles_menu_answers_200_for_it(world, who):
    user = world.users[who]
    client = Client(raise_request_exception=False)
    client.force_login(user)
    menu = menu_for(user)
    assert menu
    wrong = [f"{item['label']} {item['url']}: {status}" for item in menu
             if (status := client.get(item["url"]).status_code) != 200]
    assert not wrong, f"{who}:\n" + "\n".join(wrong)
