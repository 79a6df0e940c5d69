"""Console pages for teams, users, API keys, password and sessions, and the playground's picker and
"where it ran" panel (Django test client): each change is audited, field errors sit next to their
field, auditors read and change nothing, and the menu shows each role only what it may use."""

import re
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from citadel.accounts.models import ApiKey, Role, Team
from citadel.accounts.services import api_key_create, membership_set
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.jobs.models import InferenceJob
from citadel.quotas.models import Quota
from citadel.registry.models import Model
from citadel.registry.services import deployment_create, model_register, pool_create
from citadel.residency.services import site_create
from citadel.usage.models import UsageRecord

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("test")
PASSWORD = "correct horse battery staple 9"


@pytest.fixture
def world(tmp_path):
    users = get_user_model().objects
    red, blue = Team.objects.create(name="red"), Team.objects.create(name="blue")
    people = {"root": users.create_user("root", password=PASSWORD, is_staff=True)}
    for name, team, role in (("lead", red, Role.ADMIN), ("alice", red, Role.ML_ENGINEER),
                             ("audrey", red, Role.AUDITOR), ("bob", blue, Role.ML_ENGINEER)):
        people[name] = users.create_user(name, password=PASSWORD)
        membership_set(team=team, user=people[name], role=role, actor=SYSTEM)
    Quota.objects.create(team=red, tokens_per_month=1000)
    UsageRecord.objects.create(kind="chat", source="test:1", team=red, model_name="tiny", prompt_tokens=200,
                               completion_tokens=50)
    return SimpleNamespace(red=red, blue=blue, **people)


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def menu(html: str) -> list[str]:
    block = re.search(r'<ul id="menu-list">(.*?)</ul>', html, re.S).group(1)
    return re.findall(r">([^<]+)</a></li>", block)


def test_the_menu_follows_the_role_and_an_auditor_sees_no_playground_users_or_create_forms(world):
    root_menu = menu(signed_in(world.root).get("/teams/").content.decode())
    assert {"Users", "Sign-in locks", "Playground", "Audit", "API keys"} <= set(root_menu)
    audrey = signed_in(world.audrey)
    audrey_menu = menu(audrey.get("/teams/").content.decode())
    assert "Audit" in audrey_menu and not {"Playground", "Users", "Sign-in locks"} & set(audrey_menu)
    keys = audrey.get("/keys/").content.decode()
    assert 'id="new-key-form"' not in keys and "Revoke" not in keys
    assert audrey.get("/playground/").status_code == 403
    alice_menu = menu(signed_in(world.alice).get("/teams/").content.decode())
    assert "Playground" in alice_menu and not {"Audit", "Users", "Policies"} & set(alice_menu)


def test_teams_show_this_months_tokens_against_the_quota_and_only_the_users_teams(world):
    page = signed_in(world.alice).get("/teams/").content.decode()
    assert 'href="/teams/red/"' in page and 'href="/teams/blue/"' not in page
    assert "250 of 1000" in page and "<meter" in page and "/usage/?team=red" in page
    assert 'id="team-form"' not in page


def test_a_platform_administrator_creates_a_team_and_a_bad_name_is_refused_next_to_the_field(world):
    root = signed_in(world.root)
    bad = root.post("/teams/", {"name": "Not A Slug"})
    assert bad.status_code == 400
    assert re.search(r'id="error-name" role="alert">[^<]*must be a slug', bad.content.decode())
    made = root.post("/teams/", {"name": "green", "description": "new people"})
    assert made.status_code == 200 and Team.objects.filter(name="green").exists()
    assert AuditRecord.objects.filter(action="team.create", target_id="green").exists()
    assert signed_in(world.alice).post("/teams/", {"name": "sneaky"}).status_code == 403
    assert not Team.objects.filter(name="sneaky").exists()


def test_a_platform_administrator_adds_a_user_with_a_team_role_and_a_weak_password_is_refused(world):
    root = signed_in(world.root)
    weak = root.post("/users/", {"username": "carol", "password": "123", "team": "red", "role": Role.OPERATOR})
    assert weak.status_code == 400 and 'id="error-password"' in weak.content.decode()
    assert not get_user_model().objects.filter(username="carol").exists()
    made = root.post("/users/", {"username": "carol", "password": PASSWORD, "team": "red", "role": Role.OPERATOR})
    assert made.status_code == 200
    carol = get_user_model().objects.get(username="carol")
    assert carol.memberships.get().role == Role.OPERATOR and carol.check_password(PASSWORD)
    assert AuditRecord.objects.filter(action="user.create", target_id="carol").exists()
    listed = root.get("/users/?team=red").content.decode()
    assert "carol" in listed and "bob" not in listed
    assert signed_in(world.lead).get("/users/").status_code == 403


def test_a_new_keys_secret_is_shown_once_and_revoking_asks_for_confirmation(world):
    alice = signed_in(world.alice)
    created = alice.post("/keys/", {"name": "notebook", "team": "red", "scopes": ["inference"]})
    assert created.status_code == 200
    secret = re.search(r'id="new-key-secret">([^<]+)<', created.content.decode()).group(1)
    key = ApiKey.objects.get(name="notebook")
    assert secret.startswith(f"cit_{key.prefix}_") and key.team == world.red
    again = alice.get("/keys/").content.decode()
    assert secret not in again and key.prefix in again
    assert re.search(r'data-confirm="Revoke key ' + key.prefix, again)
    alice.post("/keys/", {"action": "revoke", "prefix": key.prefix})
    key.refresh_from_db()
    assert key.revoked_at is not None and AuditRecord.objects.filter(action__contains="revoke",
                                                                     target_id__contains=key.prefix).exists()
    assert key.prefix not in alice.get("/keys/").content.decode()
    assert key.prefix in alice.get("/keys/?show=all").content.decode()
    bobs = api_key_create(user=world.bob, name="blue-key", team=world.blue, actor=SYSTEM).api_key
    assert bobs.prefix not in alice.get("/keys/?show=all").content.decode()
    assert alice.post("/keys/", {"action": "revoke", "prefix": bobs.prefix}).status_code == 404


def test_the_password_changes_after_the_current_one_and_other_sessions_end(world):
    laptop, phone = Client(), Client()
    for client in (laptop, phone):
        assert client.post("/login/", {"username": "alice", "password": PASSWORD}).status_code == 302
    wrong = laptop.post("/account/password/", {"old_password": "nope", "new_password1": "a new long phrase 42",
                                               "new_password2": "a new long phrase 42"})
    assert wrong.status_code == 400 and 'id="error-old_password"' in wrong.content.decode()
    changed = laptop.post("/account/password/", {"old_password": PASSWORD, "new_password1": "a new long phrase 42",
                                                 "new_password2": "a new long phrase 42"})
    assert changed.status_code == 200 and "1 other session(s) ended" in changed.content.decode()
    assert laptop.get("/account/").status_code == 200
    assert phone.get("/account/").status_code == 302
    record = AuditRecord.objects.get(action="user.password_change", target_id="alice")
    assert record.details["other_sessions_ended"] == 1


def test_active_sessions_are_listed_with_where_they_came_from_and_one_is_revoked(world):
    laptop, phone = Client(HTTP_USER_AGENT="LaptopBrowser/1"), Client(HTTP_USER_AGENT="PhoneBrowser/2")
    for client in (laptop, phone):
        client.post("/login/", {"username": "audrey", "password": PASSWORD})
    page = laptop.get("/account/sessions/").content.decode()
    assert "LaptopBrowser/1" in page and "PhoneBrowser/2" in page and "(this session)" in page
    phone_id = re.search(r'PhoneBrowser/2.*?name="session" value="([0-9a-f]+)"', page, re.S).group(1)
    ended = laptop.post("/account/sessions/", {"session": phone_id})  # an auditor ends their own session
    assert ended.status_code == 200 and "PhoneBrowser/2" not in ended.content.decode()
    assert phone.get("/account/").status_code == 302
    assert AuditRecord.objects.filter(action="user.session_revoke", target_id="audrey").exists()
    assert laptop.post("/account/sessions/", {"session": "0" * 16}).status_code == 404


def test_the_playground_offers_only_adapters_the_user_may_use_and_shows_where_a_request_ran(world, tmp_path):
    from citadel.finetuning.models import File, FineTuningJob
    from citadel.residency.models import DataClass

    site = site_create(name="eu-site", jurisdiction="EU", storage_path=str(tmp_path), actor=SYSTEM)
    base = model_register(name="tiny", path=str(tmp_path / "absent"), actor=SYSTEM)  # a path on the worker hosts
    pool = pool_create(name="eu-pool", site=site, actor=SYSTEM)
    deployment_create(model=base, pool=pool, actor=SYSTEM)
    ours = Model.objects.create(name="ft-tiny-red", path=base.path, base=base, adapter_path=str(tmp_path))
    theirs = Model.objects.create(name="ft-tiny-blue", path=base.path, base=base, adapter_path=str(tmp_path))
    internal = DataClass.objects.get(name="internal")
    for model, team, user in ((ours, world.red, world.alice), (theirs, world.blue, world.bob)):
        data = File.objects.create(filename="t.jsonl", bytes=1, sha256="0" * 64, site=site, path="t.jsonl",
                                   data_class=internal, team=team, user=user)
        FineTuningJob.objects.create(model=base, training_file=data, hyperparameters={}, config={},
                                     data_class=internal, team=team, user=user, fine_tuned_model=model,
                                     status="succeeded", seed=1)
    alice = signed_in(world.alice)
    page = alice.get("/playground/").content.decode()
    assert 'value="ft-tiny-red"' in page and "ft-tiny-blue" not in page
    assert all(f'id="{name}"' in page for name in ("temperature", "top_p", "max_tokens", "seed"))
    job = InferenceJob.objects.create(kind="chat", model=base, pool=pool, site=site, user=world.alice,
                                      team=world.red, payload={}, status="succeeded", worker_name="w@host")
    from citadel.audit.services import audit_record

    audit_record(actor=SYSTEM, action="inference.chat", outcome="success", target_type="model", target_id="tiny",
                 details={"job": str(job.id), "residency": {"allowed": True, "reason": "policy 7 allows eu-site",
                                                            "policy": 7, "allowed_sites": ["eu-site"],
                                                            "jurisdiction": "EU"}})
    where = alice.get(f"/playground/jobs/{job.id}/").content.decode()
    assert re.search(r'id="where-pool">eu-pool<', where) and "eu-site (EU)" in where
    assert "allowed: policy 7 allows eu-site" in where and "sites eu-site" in where
    assert signed_in(world.bob).get(f"/playground/jobs/{job.id}/").status_code == 404


def test_an_auditor_who_changes_nothing_else_still_changes_their_own_password(world):
    audrey = signed_in(world.audrey)
    changed = audrey.post("/account/password/", {"old_password": PASSWORD, "new_password1": "auditors rotate too 77",
                                                 "new_password2": "auditors rotate too 77"})
    assert changed.status_code == 200
    world.audrey.refresh_from_db()
    assert world.audrey.check_password("auditors rotate too 77")
    assert audrey.post("/teams/", {"name": "nope"}).status_code == 403  # everything else stays read-only
