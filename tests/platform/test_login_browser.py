"""Sign-in in a real Chromium against a real gunicorn: an administrator enrols TOTP at the first
sign-in and needs the code at the next; a user signs in through single sign-on at a real OpenID
Connect provider (tests/oidc_provider) and lands with the roles their groups map to."""

import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from django.contrib.auth import get_user_model

from citadel.accounts.services import team_create
from citadel.audit.services import Actor
from citadel.sso.services import group_mapping_create
from tests import live_stack as ls
from tests.conftest import database_url, require
from tests.frontend.chromium import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CLIENT_ID, CLIENT_SECRET = "citadel-browser", "citadel-browser-secret-0123456789"
ADMIN_PASSWORD = "browser-admin-password-123"


@pytest.fixture
def servers(transactional_db, tmp_path):
    """(Citadel's base URL, the provider's issuer): both real processes."""
    from django.db import connection

    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")
    require(shutil.which(CHROMIUM) is not None, f"Chromium at {CHROMIUM} (apt-get install chromium)")
    web_port, idp_port = ls.free_port(), ls.free_port()
    # Different host names: cookies ignore ports, so the provider's session cookie would replace Citadel's.
    base, issuer = f"http://127.0.0.1:{web_port}", f"http://localhost:{idp_port}/o"
    idp_env = dict(os.environ, PYTHONPATH=str(ls.ROOT))
    idp_env.pop("DJANGO_SETTINGS_MODULE", None)
    processes = [subprocess.Popen(
        [sys.executable, "-m", "tests.oidc_provider.serve", f"--port={idp_port}", f"--dir={tmp_path / 'idp'}",
         f"--client-id={CLIENT_ID}", f"--client-secret={CLIENT_SECRET}", f"--redirect-uri={base}/sso/callback",
         "--user=frank:frank-password:ml-team", "--host=localhost"], env=idp_env, cwd=ls.ROOT,
        stdout=(tmp_path / "idp.log").open("w"), stderr=subprocess.STDOUT)]
    env = ls.process_env(database_url(), tmp_path / "data")
    env.update(CITADEL_MFA_REQUIRED="true", CITADEL_OIDC_ISSUER=issuer, CITADEL_OIDC_CLIENT_ID=CLIENT_ID,
               CITADEL_OIDC_CLIENT_SECRET=CLIENT_SECRET)
    processes.append(ls.start([sys.executable, "-m", "gunicorn", "citadel.wsgi:application", f"--bind=127.0.0.1:{web_port}",
                               "--worker-class=gthread", "--workers=1", "--threads=4"], env, tmp_path / "web.log"))
    try:
        ls.wait_until(lambda: httpx.get(f"{base}/healthz").status_code == 200, 60, "gunicorn answering")
        ls.wait_until(lambda: httpx.get(f"{issuer}/.well-known/openid-configuration").status_code == 200, 60,
                      "the OIDC provider answering")
        yield base, issuer
    finally:
        ls.stop(processes)


@pytest.fixture
def page(servers):
    from playwright.sync_api import sync_playwright

    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # see tests/frontend/test_console_browser.py
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(base_url=servers[0])
            page = context.new_page()
            page.set_default_timeout(30_000)
            _usable_connection()
            yield page
            browser.close()
    finally:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


def _usable_connection() -> None:
    """Reconnect when an earlier module's live stack ended by terminating this database's other sessions
    (tests/conftest.py): under Playwright's event loop the test may be handed that terminated one."""
    from django.db import connection

    if connection.connection is not None and not connection.is_usable():
        connection.close()


def _sign_in(page, username, password):
    page.goto("/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("main button[type=submit]")


def test_an_administrator_enrols_totp_at_the_first_sign_in_and_needs_the_code_afterwards(page):
    from citadel.accounts.totp import totp_code

    get_user_model().objects.create_user("boss", password=ADMIN_PASSWORD, is_staff=True)
    _sign_in(page, "boss", ADMIN_PASSWORD)
    page.wait_for_url("**/account/totp/")
    assert page.locator("#totp-qr svg").count() == 1
    secret = page.locator("#totp-secret").inner_text()
    assert page.locator("#totp-uri").inner_text().startswith("otpauth://totp/Citadel:boss?")
    page.goto("/models/")
    page.wait_for_url("**/account/totp/")  # nothing else until enrolled
    page.fill("input[name=code]", totp_code(secret=secret))
    page.click("main button[type=submit]")
    page.wait_for_url("**/account/")
    page.click("form.logout button")
    page.wait_for_url("**/login/")
    _sign_in(page, "boss", ADMIN_PASSWORD)
    page.wait_for_url("**/login/totp/")
    page.fill("input[name=code]", "000000")
    page.click("main button[type=submit]")
    assert "not right" in page.get_by_role("alert").inner_text()
    page.fill("input[name=code]", totp_code(secret=secret, at=time.time() + 30))  # the next step's: no replay
    page.click("main button[type=submit]")
    page.wait_for_url("**/models/")


def test_oidc_single_sign_on_in_a_browser_lands_with_the_mapped_team_and_role(page):
    team = team_create(name="research", actor=Actor.system())
    group_mapping_create(group="ml-team", team=team, role="ml_engineer", actor=Actor.system())
    page.goto("/login/")
    page.click("#sso-login")
    page.wait_for_url("**/accounts/login/**")  # at the provider
    page.fill("input[name=username]", "frank")
    page.fill("input[name=password]", "frank-password")
    page.click("button[type=submit]")
    try:
        page.wait_for_url("**/models/")
    except Exception:
        raise AssertionError(f"{page.url}\n{page.content()[:2000]}") from None
    page.goto("/account/")
    row = page.locator("#memberships tr", has_text="research")
    assert "ML engineer" in row.inner_text() and "oidc" in row.inner_text()
