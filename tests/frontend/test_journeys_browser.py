"""One journey per role through the console in a real Chromium, against the live stack (gunicorn and a
real Celery worker serving the tiny model): each person signs in with their second factor (the TOTP
code computed here) and does their daily work.

- team admin: creates an API key (the secret shown once), chats with streaming in the playground and
  sees where the answer ran; the menu collapses in a narrow window and the skip link comes first;
- operator: the models page and a seeded chat;
- application: may not sign in to the console; its key streams a chat over /v1;
- platform administrator: edits the team's residency policy so the team's requests are denied, sees
  the denied request in the audit view, and restores the policy;
- auditor: no playground, no edit buttons; verifies the audit chain and exports the log;
- ML engineer: uploads a dataset, submits a fine-tuning job and watches its progress arrive, then
  cancels it (the long run to the end is test_finetuning_browser's).

No page may trip the Content-Security-Policy: every journey fails on a CSP report in the console.
Screenshots of the main pages go to var/screenshots/ (git-ignored).
"""

import http.client
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.frontend.chromium import chromium
from tests.frontend.test_finetuning_browser import TRAIN_LINES, curve_points, dataset, submit_job, upload

pytestmark = [pytest.mark.browser, pytest.mark.django_db]

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "var" / "screenshots"
TEAM = "journey"
PASSWORD = "journey-password-123"
ROLES = ("admin", "operator", "ml_engineer", "auditor", "application")


@pytest.fixture(scope="module")
def journey(live_stack, django_db_blocker, tmp_path_factory):
    """The live stack, with team `journey` (one member per role, each with a confirmed TOTP device), its
    policy for internal data at site-a (fine-tuning allowed), a platform administrator with TOTP, and
    an API key of the team's application account."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from citadel.accounts.models import TotpDevice
    from citadel.accounts.services import api_key_create, membership_set, team_create
    from citadel.audit.services import Actor
    from citadel.residency.models import DataClass, Site
    from citadel.residency.services import policy_create, site_update

    system = Actor.system("test")
    users, secrets = {}, {}
    with django_db_blocker.unblock():
        site = Site.objects.get(name="site-a")
        site_update(site=site, actor=system, storage_path=str(tmp_path_factory.mktemp("journey-store")))
        team = team_create(name=TEAM, actor=system)
        policy = policy_create(team=team, data_class=DataClass.objects.get(name="internal"), actor=system,
                               processing_sites=[site], storage_sites=[site], fine_tuning_allowed=True,
                               prompt_retention="full")
        User = get_user_model()
        for role in ROLES:
            users[role] = User.objects.create_user(f"j-{role}", password=PASSWORD)
            membership_set(team=team, user=users[role], role=role, actor=system)
        users["platform_admin"] = User.objects.create_user("j-root", password=PASSWORD, is_staff=True)
        from citadel.accounts.totp import totp_enrol_start

        for who, user in users.items():
            device = totp_enrol_start(user=user)
            TotpDevice.objects.filter(pk=device.pk).update(confirmed_at=timezone.now())
            secrets[who] = device.secret
        app_key = api_key_create(user=users["application"], name="journey-app", team=team, actor=system).key
    return SimpleNamespace(stack=live_stack, users=users, secrets=secrets, app_key=app_key, policy=policy,
                           site=site)


@pytest.fixture(scope="module")
def browser(journey):
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser, journey):
    context = browser.new_context(base_url=journey.stack.base_url, viewport={"width": 1366, "height": 900},
                                  accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    violations = []
    page.on("console", lambda message: violations.append(message.text)
            if "Content Security Policy" in message.text else None)
    yield page
    context.close()
    assert not violations, "the Content-Security-Policy blocked something:\n" + "\n".join(violations)


def sign_in(page, journey, who: str, landing: str = "/account/") -> None:
    """Password, then the current TOTP code from the user's secret (each user signs in once per run,
    so the code's step has not been used)."""
    from citadel.accounts.totp import totp_code

    page.goto(f"/login/?next={landing}")
    page.fill("input[name=username]", journey.users[who].username)
    page.fill("input[name=password]", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url("**/login/totp/")
    page.fill("input[name=code]", totp_code(secret=journey.secrets[who]))
    page.click("main button[type=submit]")
    page.wait_for_url(f"**{landing}")


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def menu(page) -> list[str]:
    return [text.strip() for text in page.locator("#menu-list a").all_inner_texts()]


def chat(page, message: str, **settings) -> str:
    page.goto("/playground/")
    page.select_option("#model", "tiny")
    for name, value in {"max_tokens": "8", **settings}.items():
        page.fill(f"#{name}", value)
    page.fill("#message", message)
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-done=true]", timeout=120_000)
    assert page.locator("#chat-error").is_hidden(), page.locator("#chat-error").inner_text()
    return page.locator(".msg.assistant").last.inner_text()


def api(journey, path: str, body: dict | None = None, key: str | None = None):
    """A call to the OpenAI API of the live stack: (status, body text)."""
    request = urllib.request.Request(f"{journey.stack.base_url}{path}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Bearer {key or journey.app_key}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except http.client.IncompleteRead as error:  # the server ended the stream early: say why, from its logs
        pytest.fail(f"{path}: the answer broke off after {len(error.partial)} bytes ({error.partial[-200:]!r});"
                    f" the stack's logs:\n{journey.stack.log_tail()}")


def test_a_team_admin_creates_a_key_shown_once_chats_and_sees_where_the_answer_ran(page, journey):
    sign_in(page, journey, "admin")
    assert {"Playground", "API keys", "Teams"} <= set(menu(page)) and not {"Audit", "Users"} & set(menu(page))
    page.click("#menu-list >> text=API keys")
    page.fill("#key-name", "ci-pipeline")
    page.select_option("#key-team", TEAM)
    page.click("#create-key")
    secret = page.locator("#new-key-secret").inner_text()
    assert secret.startswith("cit_")
    shot(page, "keys-created")
    assert api(journey, "/v1/models", key=secret)[0] == 200  # the key works at once
    page.goto("/keys/")
    assert secret not in page.content()  # shown once, never again
    assert page.locator("#keys tr", has_text="ci-pipeline").count() == 1

    reply = chat(page, "Hello from the team admin")
    assert reply.strip()
    page.wait_for_selector("#where:not([hidden])")
    assert page.locator("#where-pool").inner_text() == "e2e"
    assert page.locator("#where-site").inner_text().startswith("site-a")
    assert page.locator("#where-decision").inner_text().startswith("allowed")
    shot(page, "playground")

    page.goto(f"/teams/{TEAM}/")
    assert page.locator("#members tr", has_text="j-auditor").count() == 1

    page.set_viewport_size({"width": 420, "height": 860})  # a narrow window: the menu folds away
    page.goto("/teams/")
    page.keyboard.press("Tab")  # the first stop is the skip link, which shows itself
    assert page.evaluate("document.activeElement.className") == "skip-link"
    assert page.locator(".skip-link").is_visible()
    assert page.locator("#menu-list").is_hidden()
    page.click(".nav-toggle")
    assert page.locator("#menu-list").is_visible()
    assert page.get_attribute(".nav-toggle", "aria-expanded") == "true"
    shot(page, "narrow-menu")


def test_an_operator_sees_the_model_served_and_chats_with_a_seed(page, journey):
    sign_in(page, journey, "operator", landing="/models/")
    assert page.locator("tr", has_text="tiny").count() >= 1
    shot(page, "models")
    first = chat(page, "Count to three", temperature="1", seed="7", top_p="0.9")
    assert first.strip()


def test_an_application_may_not_sign_in_but_its_key_streams_a_chat(page, journey):
    page.goto("/login/")
    page.fill("input[name=username]", "j-application")
    page.fill("input[name=password]", PASSWORD)
    page.click("main button[type=submit]")
    assert "use API keys" in page.get_by_role("alert").inner_text()
    status, body = api(journey, "/v1/chat/completions", {"model": "tiny", "stream": True, "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk"


def test_a_platform_administrator_edits_a_policy_and_sees_the_denied_request_in_the_audit_view(page, journey):
    sign_in(page, journey, "platform_admin", landing="/residency/admin/")
    policy = journey.policy
    page.click(f"#policy-{policy.pk} >> text=Edit")
    page.uncheck("#processing_sites input[value=site-a]")
    other = "CH" if journey.site.jurisdiction != "CH" else "DE"
    page.fill("#processing_jurisdictions", other)
    page.click("#save-policy")
    page.wait_for_url("**/residency/admin/**")
    assert other in page.locator(f"#policy-{policy.pk}").inner_text()
    try:
        status, body = api(journey, "/v1/chat/completions",
                           {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 403 and "residency" in body.lower(), body

        page.goto("/audit/?outcome=denied&action=inference.*")
        row = page.locator("#audit-records tbody tr", has_text="inference.chat").first
        assert "model:tiny" in row.inner_text() and "denied" in row.inner_text()
        shot(page, "audit-denied")
        row.locator("a").first.click()
        page.wait_for_url("**/audit/records/*/")
        assert "residency" in page.content()
    finally:  # the later journeys need the team's requests allowed again
        page.goto(f"/residency/policies/{policy.pk}/edit/")
        page.check("#processing_sites input[value=site-a]")
        page.fill("#processing_jurisdictions", "")
        page.click("#save-policy")
        page.wait_for_url("**/residency/admin/**")
    assert api(journey, "/v1/models")[0] == 200


def test_an_auditor_verifies_the_chain_and_exports_the_audit_log_and_can_change_nothing(page, journey):
    sign_in(page, journey, "auditor", landing="/audit/")
    assert "Audit" in menu(page) and not {"Playground", "Users", "Sign-in locks"} & set(menu(page))
    page.click("#verify-button")
    result = page.locator("#verify-result")
    result.wait_for()
    assert "Verified." in result.inner_text()
    shot(page, "audit-verified")
    with page.expect_download() as download:
        page.click("#export-jsonl")
    lines = Path(download.value.path()).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert any(r.get("action") == "inference.chat" and r.get("outcome") == "denied" for r in records)
    page.goto("/keys/")
    assert page.locator("#keys tr", has_text="ci-pipeline").count() == 1  # auditors read the keys
    assert page.locator("#new-key-form").count() == 0 and page.locator(".revoke-form").count() == 0
    page.goto(f"/teams/{TEAM}/")
    assert page.locator("#member-form").count() == 0
    assert page.goto("/playground/").status == 403


def test_an_ml_engineer_submits_a_fine_tuning_job_watches_its_progress_and_cancels_it(page, journey, tmp_path):
    sign_in(page, journey, "ml_engineer", landing="/fine-tuning/")
    upload(page, dataset(tmp_path, "journey.jsonl", TRAIN_LINES[:64]))
    page.wait_for_selector("#uploaded-id")
    submit_job(page, page.locator("#uploaded-id").inner_text(), epochs="3", checkpoint_every="0")
    page.wait_for_url("**/fine-tuning/jobs/ftjob-*/")
    deadline = time.monotonic() + 240
    while curve_points(page) < 1:  # progress arrives by htmx while the worker trains
        assert time.monotonic() < deadline, "no training progress within 4 minutes"
        page.wait_for_timeout(1000)
    assert page.locator("#job-live").get_attribute("data-status") == "running"
    shot(page, "finetuning-job")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel-job")
    page.wait_for_selector("#job-live[data-status=cancelled]")
