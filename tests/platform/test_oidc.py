"""Single sign-on against a real OpenID Connect provider that the test starts on localhost
(django-oauth-toolkit, tests/oidc_provider): discovery, authorization code with PKCE, state and
nonce, an RS256 ID token checked against the provider's keys, and the groups mapped to teams."""

import os
import subprocess
import sys
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from citadel.accounts.models import Membership, Role
from citadel.accounts.services import membership_set, team_create
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.sso.models import OidcIdentity
from tests import live_stack as ls

pytestmark = pytest.mark.django_db

CLIENT_ID, CLIENT_SECRET = "citadel-test", "citadel-test-secret-0123456789"
REDIRECT = "http://testserver/sso/callback"
USERS = {"carol": ("carol-password", "ml-team,compliance"), "dave": ("dave-password", "unmapped"),
         "erin": ("erin-password", "platform-admins")}


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    """The provider's issuer URL, with the process running until the module ends."""
    folder = tmp_path_factory.mktemp("idp")
    port = ls.free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ls.ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    args = [sys.executable, "-m", "tests.oidc_provider.serve", f"--port={port}", f"--dir={folder}",
            f"--client-id={CLIENT_ID}", f"--client-secret={CLIENT_SECRET}", f"--redirect-uri={REDIRECT}"]
    args += [f"--user={name}:{password}:{groups}" for name, (password, groups) in USERS.items()]
    process = subprocess.Popen(args, env=env, cwd=ls.ROOT, stdout=(folder / "idp.log").open("w"),
                               stderr=subprocess.STDOUT)
    issuer = f"http://127.0.0.1:{port}/o"
    try:
        ls.wait_until(lambda: httpx.get(f"{issuer}/.well-known/openid-configuration").status_code == 200, 60,
                      f"the OIDC provider answering\n{(folder / 'idp.log').read_text()}")
        yield issuer
    finally:
        ls.stop([process])


@pytest.fixture
def sso(provider):
    with override_settings(CITADEL_OIDC_ISSUER=provider, CITADEL_OIDC_CLIENT_ID=CLIENT_ID,
                           CITADEL_OIDC_CLIENT_SECRET=CLIENT_SECRET):
        yield provider


@pytest.fixture
def mapped(db):
    """Teams and the group mappings, made through the management API as a platform administrator."""
    team_create(name="research", actor=Actor.system())
    team_create(name="oversight", actor=Actor.system())
    root = Client()
    root.force_login(get_user_model().objects.create_user("root", password="x" * 16, is_staff=True))
    for body in ({"group": "ml-team", "team": "research", "role": "ml_engineer"},
                 {"group": "compliance", "team": "oversight", "role": "auditor"},
                 {"group": "platform-admins", "platform_admin": True}):
        response = root.post("/api/v1/sso/group-mappings/", body, content_type="application/json")
        assert response.status_code == 201, response.content
    return root


def _provider_login(authorize_url: str, username: str) -> str:
    """What a browser does at the provider: follow to its login form, sign in, come back with a code.
    Returns the URL the provider redirects to (Citadel's callback with code and state)."""
    with httpx.Client(follow_redirects=False, timeout=30) as browser:
        response = browser.get(authorize_url)
        assert response.status_code == 302 and "/accounts/login/" in response.headers["location"]
        login_url = httpx.URL(authorize_url).join(response.headers["location"])
        form = browser.get(login_url)
        token = browser.cookies["csrftoken"]
        nxt = parse_qs(urlparse(str(login_url)).query)["next"][0]
        response = browser.post(login_url, data={"username": username, "password": USERS[username][0], "next": nxt,
                                                 "csrfmiddlewaretoken": token},
                                headers={"Referer": str(login_url)})
        assert response.status_code == 302, form.text[:500]
        response = browser.get(httpx.URL(authorize_url).join(response.headers["location"]))
        assert response.status_code == 302, response.text[:500]
        return response.headers["location"]


def _start(client: Client) -> str:
    response = client.get("/sso/login?next=/account/")
    assert response.status_code == 302
    location = response["Location"]
    query = parse_qs(urlparse(location).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    assert query["state"][0] and query["nonce"][0] and query["client_id"] == [CLIENT_ID]
    return location


def _callback(client: Client, redirect: str):
    assert redirect.startswith(REDIRECT)
    return client.get(redirect.replace("http://testserver", ""))


def test_oidc_sign_in_end_to_end_applies_the_group_mapping(sso, mapped):
    client = Client()
    client.get("/login/")
    before = client.cookies.get("sessionid")
    redirect = _provider_login(_start(client), "carol")
    response = _callback(client, redirect)
    assert response.status_code == 302 and response["Location"] == "/account/"
    assert client.cookies["sessionid"].value != (before.value if before else None)
    me = client.get("/api/v1/me/").json()
    assert me["username"] == "carol"
    assert {(m["team"], m["role"], m["source"]) for m in me["memberships"]} == {
        ("research", "ml_engineer", "oidc"), ("oversight", "auditor", "oidc")}
    identity = OidcIdentity.objects.get(user__username="carol")
    assert identity.issuer == sso and identity.last_groups == ["compliance", "ml-team"]
    assert not get_user_model().objects.get(username="carol").has_usable_password()
    assert AuditRecord.objects.filter(action="user.login", outcome="success", target_id="carol").exists()
    assert AuditRecord.objects.filter(action="team.member.set", details__source="oidc").count() == 2


def test_a_later_sign_in_replaces_the_roles_the_groups_gave(sso, mapped):
    client = Client()
    _callback(client, _provider_login(_start(client), "carol"))
    carol = get_user_model().objects.get(username="carol")
    research = carol.memberships.get(team__name="research").team
    mapped.delete(f"/api/v1/sso/group-mappings/{_mapping_id(mapped, 'compliance')}/")
    local = team_create(name="local-team", actor=Actor.system())
    membership_set(team=local, user=carol, role=Role.ML_ENGINEER, actor=Actor.system())  # granted in Citadel
    again = Client()
    _callback(again, _provider_login(_start(again), "carol"))
    assert set(Membership.objects.filter(user=carol).values_list("team__name", flat=True)) == {
        research.name, "local-team"}  # the oidc-granted auditor role is gone; the local membership stays


def _mapping_id(client, group):
    return next(m["id"] for m in client.get("/api/v1/sso/group-mappings/").json() if m["group"] == group)


def test_a_platform_admin_group_makes_a_platform_administrator_who_still_enrols_citadels_totp(sso, mapped):
    client = Client()
    response = _callback(client, _provider_login(_start(client), "erin"))
    assert response["Location"] == "/account/totp/"  # administrators need a second factor, SSO or not
    assert get_user_model().objects.get(username="erin").is_staff
    with override_settings(CITADEL_OIDC_MFA_FROM_PROVIDER=True):  # the provider is trusted to have asked
        trusted = Client()
        assert _callback(trusted, _provider_login(_start(trusted), "erin"))["Location"] == "/account/"
        assert trusted.get("/api/v1/me/").json()["platform_admin"] is True


def test_a_user_whose_groups_map_to_nothing_is_refused_and_audited(sso, mapped):
    client = Client()
    response = _callback(client, _provider_login(_start(client), "dave"))
    assert response.status_code == 403 and b"None of your identity provider groups" in response.content
    assert not get_user_model().objects.filter(username="dave").exists()
    assert AuditRecord.objects.filter(action="sso.login", outcome="denied", details__reason="no_group_mapping").exists()


def test_a_forged_state_or_a_replayed_code_is_refused(sso, mapped):
    client = Client()
    redirect = _provider_login(_start(client), "carol")
    forged = redirect.replace("state=", "state=x")
    assert _callback(client, forged).status_code == 403
    # The callback in another browser (no state in its session) is refused, as is using a code twice.
    assert _callback(Client(), redirect).status_code == 403
    assert _callback(client, redirect).status_code == 302
    assert _callback(client, redirect).status_code == 403
    assert AuditRecord.objects.filter(action="sso.login", outcome="failure").count() >= 2


def test_the_login_page_offers_single_sign_on_only_when_configured(sso):
    assert b'id="sso-login"' in Client().get("/login/").content
    with override_settings(CITADEL_OIDC_ISSUER=""):
        assert b'id="sso-login"' not in Client().get("/login/").content
        assert Client().get("/sso/login").status_code == 404
