"""Console sign-in: Argon2id hashes, lockout per account and per address (audited), TOTP as a second
factor (required for administrators and operators), session id rotation, idle expiry, CSRF."""

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password, make_password
from django.contrib.sessions.models import Session
from django.test import Client, override_settings
from django.utils import timezone

from citadel.accounts.models import LoginLock, Role, TotpDevice
from citadel.accounts.services import membership_set, team_create
from citadel.accounts.totp import totp_code
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.settings import base

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
ADDRESSES = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]


@pytest.fixture
def alice(db):
    return get_user_model().objects.create_user("alice", password=PASSWORD)


def _post_login(client, username, password, address="10.9.9.9"):
    return client.post("/login/", {"username": username, "password": password}, REMOTE_ADDR=address)


def test_passwords_are_hashed_with_argon2id():
    with override_settings(PASSWORD_HASHERS=base.PASSWORD_HASHERS):
        hashed = make_password(PASSWORD)
        assert hashed.startswith("argon2$argon2id$")
        assert check_password(PASSWORD, hashed) and not check_password("wrong", hashed)


def test_150_wrong_passwords_from_several_addresses_lock_the_account_after_at_most_10_and_each_lockout_is_audited(
        alice):
    client = Client()
    locked_after = None
    for attempt in range(1, 151):
        response = _post_login(client, "alice", f"wrong-{attempt}", ADDRESSES[attempt % len(ADDRESSES)])
        assert response.status_code == 200 and not response.wsgi_request.user.is_authenticated
        if locked_after is None and LoginLock.objects.filter(kind="account", key="alice").exists():
            locked_after = attempt
    assert locked_after is not None and locked_after <= 10
    # During the cool-off the right password is refused too, from any address, saying why.
    for address in ADDRESSES + ["192.0.2.77"]:
        response = _post_login(client, "alice", PASSWORD, address)
        assert not response.wsgi_request.user.is_authenticated
        assert b'id="locked"' in response.content
    locks = list(LoginLock.objects.all())
    lockouts = AuditRecord.objects.filter(action="user.lockout")
    assert lockouts.count() == len(locks) >= 1
    for lock in locks:
        assert lockouts.filter(target_id=lock.key, details__kind=lock.kind).exists()
    assert AuditRecord.objects.filter(action="user.login", outcome="failure").count() >= 150
    # After the cool-off, the right password works again.
    LoginLock.objects.update(until=timezone.now() - timedelta(seconds=1))
    response = _post_login(client, "alice", PASSWORD, ADDRESSES[0])
    assert response.status_code == 302 and response.wsgi_request.user.is_authenticated


def test_an_address_that_tries_many_accounts_is_locked(alice):
    client = Client()
    for number in range(20):
        _post_login(client, f"guess-{number}", "password", "203.0.113.9")
    assert LoginLock.objects.filter(kind="address", key="203.0.113.9").exists()
    assert not _post_login(client, "alice", PASSWORD, "203.0.113.9").wsgi_request.user.is_authenticated
    assert _post_login(Client(), "alice", PASSWORD, "198.51.100.1").wsgi_request.user.is_authenticated
    assert AuditRecord.objects.filter(action="user.lockout", target_id="203.0.113.9").count() == 1


def test_a_platform_administrator_can_lift_a_lock_and_that_is_audited(alice):
    client = Client()
    for _ in range(5):
        _post_login(client, "alice", "wrong")
    root = Client()
    root.force_login(get_user_model().objects.create_user("root", password="x" * 16, is_staff=True))
    assert root.get("/api/v1/login-locks/").json()[0]["key"] == "alice"
    assert root.post("/api/v1/login-locks/", {"kind": "account", "key": "alice"},
                     content_type="application/json").status_code == 200
    assert AuditRecord.objects.filter(action="user.lockout.lift", target_id="alice").exists()
    assert _post_login(client, "alice", PASSWORD).wsgi_request.user.is_authenticated


def _enrolled(user):
    return TotpDevice.objects.create(user=user, secret=SECRET, confirmed_at=timezone.now())


def test_with_totp_the_password_alone_does_not_sign_in_and_the_code_does_once(alice):
    _enrolled(alice)
    client = Client()
    client.get("/login/")
    response = _post_login(client, "alice", PASSWORD)
    assert response.status_code == 302 and response["Location"] == "/login/totp/"
    assert not client.get("/models/").wsgi_request.user.is_authenticated
    pending_session = client.session.session_key
    assert client.post("/login/totp/", {"code": "000000"}).status_code == 400
    code = totp_code(secret=SECRET)
    response = client.post("/login/totp/", {"code": code})
    assert response.status_code == 302 and response.wsgi_request.user.is_authenticated
    assert client.session.session_key != pending_session  # rotated at sign-in
    # The same code cannot be used again (replay), even by someone who saw it.
    other = Client()
    _post_login(other, "alice", PASSWORD)
    assert other.post("/login/totp/", {"code": code}).status_code == 400
    assert AuditRecord.objects.filter(action="user.login.totp", outcome="failure").count() == 2


def test_the_session_id_rotates_at_sign_in(alice):
    client = Client()
    session = client.session
    session["before"] = 1
    session.save()
    before = session.session_key
    client.cookies["sessionid"] = before
    assert _post_login(client, "alice", PASSWORD).status_code == 302
    assert client.cookies["sessionid"].value != before
    assert not Session.objects.filter(session_key=before).exists()


@pytest.mark.parametrize("how", ["staff", Role.ADMIN, Role.OPERATOR])
def test_administrators_and_operators_must_enrol_totp_before_anything_else(how):
    user = get_user_model().objects.create_user("boss", password=PASSWORD, is_staff=how == "staff")
    if how != "staff":
        membership_set(team=team_create(name="ops", actor=Actor.system()), user=user, role=how,
                       actor=Actor.system())
    client = Client()
    response = _post_login(client, "boss", PASSWORD)
    assert response["Location"] == "/account/totp/"
    assert client.get("/models/")["Location"] == "/account/totp/"
    refused = client.get("/api/v1/keys/")
    assert refused.status_code == 403 and refused.json()["code"] == "mfa_enrolment_required"
    page = client.get("/account/totp/")
    uri = re.search(rb'id="totp-uri">([^<]+)<', page.content).group(1).decode().replace("&amp;", "&")
    assert uri.startswith("otpauth://totp/Citadel:boss?") and "issuer=Citadel" in uri
    assert b"<svg" in page.content  # the QR code
    secret = re.search(r"secret=([A-Z2-7]+)", uri).group(1)
    assert client.post("/account/totp/", {"code": "123456"}).status_code == 400
    assert client.post("/account/totp/", {"code": totp_code(secret=secret)})["Location"] == "/account/"
    assert client.get("/models/").status_code == 200
    assert client.get("/api/v1/keys/").status_code == 200
    assert AuditRecord.objects.filter(action="user.totp.confirm", outcome="success", target_id="boss").exists()


def test_an_ml_engineer_is_not_asked_for_a_second_factor(alice):
    assert _post_login(Client(), "alice", PASSWORD)["Location"] == "/models/"


def test_an_idle_session_expires(alice):
    from django.conf import settings

    assert settings.SESSION_SAVE_EVERY_REQUEST and settings.SESSION_COOKIE_AGE == 30 * 60
    client = Client()
    _post_login(client, "alice", PASSWORD)
    assert client.get("/models/").status_code == 200
    Session.objects.update(expire_date=timezone.now() - timedelta(seconds=1))
    response = client.get("/models/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_every_session_post_needs_the_csrf_token(alice):
    client = Client(enforce_csrf_checks=True)
    assert client.post("/login/", {"username": "alice", "password": PASSWORD}).status_code == 403
    client.get("/login/")
    token = client.cookies["csrftoken"].value
    assert client.post("/login/", {"username": "alice", "password": PASSWORD,
                                   "csrfmiddlewaretoken": token}).status_code == 302
    token = client.cookies["csrftoken"].value  # rotated at sign-in
    assert client.post("/api/v1/keys/", {"name": "k"}, content_type="application/json").status_code == 403
    assert client.post("/account/", {"name": "k"}).status_code == 403
    assert client.post("/api/v1/keys/", {"name": "k"}, content_type="application/json",
                       HTTP_X_CSRFTOKEN=token).status_code == 201


def test_the_admin_site_signs_in_through_the_console(alice):
    response = Client().get("/admin/login/?next=/admin/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_the_account_page_shows_roles_and_creates_a_scoped_key_shown_once(alice):
    team = team_create(name="research", actor=Actor.system())
    membership_set(team=team, user=alice, role=Role.ML_ENGINEER, actor=Actor.system())
    client = Client()
    client.force_login(alice)
    page = client.post("/account/", {"name": "notebook", "team": "research", "scopes": ["inference", "files"]})
    assert page.status_code == 200 and b'id="new-key"' in page.content
    assert b"ML engineer" in page.content and b"inference, files" in page.content


def test_a_team_admin_manages_members_on_the_team_page_and_others_only_read_it(alice):
    team = team_create(name="research", actor=Actor.system())
    membership_set(team=team, user=alice, role=Role.ADMIN, actor=Actor.system())
    bob = get_user_model().objects.create_user("bob", password="x" * 16)
    lead = Client()
    lead.force_login(alice)
    assert lead.post("/teams/research/", {"user": "bob", "role": "ml_engineer"}).status_code == 200
    assert bob.memberships.get().role == "ml_engineer"
    assert lead.post("/teams/research/", {"user": "bob", "role": "operator"}).status_code == 400  # platform's
    member = Client()
    member.force_login(bob)
    page = member.get("/teams/research/")
    assert page.status_code == 200 and b'id="member-form"' not in page.content
    assert member.post("/teams/research/", {"user": "bob", "role": "admin"}).status_code == 400
    outsider = Client()
    outsider.force_login(get_user_model().objects.create_user("eve", password="x" * 16))
    assert outsider.get("/teams/research/").status_code == 404


def test_totp_secrets_are_stored_encrypted_and_survive_a_secret_key_rotation(alice):
    device = _enrolled(alice)
    stored = TotpDevice.objects.values_list("secret_encrypted", flat=True).get()
    assert SECRET not in stored and TotpDevice.objects.get().secret == SECRET
    with override_settings(SECRET_KEY="a-new-key", SECRET_KEY_FALLBACKS=["test-only-not-secret"]):
        assert TotpDevice.objects.get(pk=device.pk).secret == SECRET
    with override_settings(SECRET_KEY="a-new-key", SECRET_KEY_FALLBACKS=[]):
        with pytest.raises(Exception):  # noqa: B017 - cryptography's InvalidToken: the old key is gone
            _ = TotpDevice.objects.get(pk=device.pk).secret


def test_a_platform_administrator_sets_a_team_quota_on_the_team_page_and_a_team_admin_cannot(alice):
    from citadel.quotas.models import Quota

    team = team_create(name="research", actor=Actor.system())
    membership_set(team=team, user=alice, role=Role.ADMIN, actor=Actor.system())
    limits = {"action": "quota", "requests_per_minute": "60", "tokens_per_minute": "", "tokens_per_month": "1000000",
              "gpu_hours_per_month": "2.5"}
    lead = Client()
    lead.force_login(alice)
    assert lead.post("/teams/research/", limits).status_code == 400 and not Quota.objects.exists()
    root = Client()
    root.force_login(get_user_model().objects.create_user("root", password="x" * 16, is_staff=True))
    assert root.post("/teams/research/", limits).status_code == 200
    quota = Quota.objects.get(team=team)
    assert (quota.requests_per_minute, quota.tokens_per_minute, quota.tokens_per_month,
            quota.gpu_hours_per_month) == (60, None, 1_000_000, 2.5)
    assert AuditRecord.objects.filter(action="quota.set", target_id="research").exists()


def test_an_application_account_does_not_sign_in_to_the_console(alice):
    membership_set(team=team_create(name="apps", actor=Actor.system()), user=alice, role=Role.APPLICATION,
                   actor=Actor.system())
    response = _post_login(Client(), "alice", PASSWORD)
    assert response.status_code == 200 and not response.wsgi_request.user.is_authenticated
    assert b"Application accounts use API keys" in response.content
    assert AuditRecord.objects.filter(action="user.login", outcome="denied",
                                      details__reason="application_account").exists()


def test_totp_through_the_management_api_in_a_session_and_a_lost_device_reset_by_an_administrator(alice):
    client = Client()
    client.force_login(alice)
    assert client.get("/api/v1/me/totp/").json() == {"enrolled": False, "required": False}
    started = client.post("/api/v1/me/totp/").json()
    assert started["otpauth_uri"].startswith("otpauth://totp/Citadel:alice?")
    assert client.post("/api/v1/me/totp/confirm/", {"code": "000000"},
                       content_type="application/json").status_code == 400
    confirmed = client.post("/api/v1/me/totp/confirm/", {"code": totp_code(secret=started["secret"])},
                            content_type="application/json")
    assert confirmed.json()["enrolled"] is True
    assert client.post("/api/v1/me/totp/").status_code == 400  # one device; an admin removes it first
    from citadel.accounts.services import api_key_create

    key = api_key_create(user=alice, name="k", actor=Actor.system()).key
    refused = Client(HTTP_AUTHORIZATION=f"Bearer {key}").post("/api/v1/me/totp/")
    assert refused.status_code == 403 and refused.json()["code"] == "session_required"
    assert client.delete("/api/v1/users/alice/totp/").status_code == 403
    root = Client()
    root.force_login(get_user_model().objects.create_user("root", password="x" * 16, is_staff=True))
    assert root.delete("/api/v1/users/alice/totp/").status_code == 204
    assert not TotpDevice.objects.filter(user=alice).exists()
    assert AuditRecord.objects.filter(action="user.totp.remove", target_id="alice", actor_label="root").exists()


def test_an_auditor_enrols_their_own_second_factor_through_the_api():
    user = get_user_model().objects.create_user("officer", password=PASSWORD)
    membership_set(team=team_create(name="compliance", actor=Actor.system()), user=user, role=Role.AUDITOR,
                   actor=Actor.system())
    client = Client()
    client.force_login(user)
    started = client.post("/api/v1/me/totp/")
    assert started.status_code == 201
    assert client.post("/api/v1/me/totp/confirm/", {"code": totp_code(secret=started.json()["secret"])},
                       content_type="application/json").json()["enrolled"] is True


def test_check_deploy_warns_when_sign_in_is_weakened(tmp_path):
    from tests.platform.test_settings import run_manage

    result = run_manage(["check", "--deploy", "--fail-level", "WARNING"],
                        DJANGO_SETTINGS_MODULE="citadel.settings.production",
                        DJANGO_SECRET_KEY="a-long-random-production-secret-" + "x7Yq2" * 10,
                        CITADEL_AUDIT_SIGNING_KEY="A" * 43 + "=", ALLOWED_HOSTS="citadel.example.org",
                        CITADEL_DATA_DIR=str(tmp_path), CITADEL_MFA_REQUIRED="false",
                        CITADEL_OIDC_ISSUER="http://idp.example.org", CITADEL_OIDC_CLIENT_ID="c")
    assert result.returncode != 0
    assert "citadel.W101" in result.stderr and "citadel.W103" in result.stderr
