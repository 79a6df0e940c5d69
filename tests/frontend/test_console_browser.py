"""The console in a real Chromium: log in, see the models, stream a chat in the playground."""


import pytest

from tests.frontend.chromium import chromium

pytestmark = [pytest.mark.browser, pytest.mark.django_db]



@pytest.fixture(scope="module")
def browser(live_stack):
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser, live_stack):
    context = browser.new_context(base_url=live_stack.base_url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def log_in(page, password="e2e-admin-password-123"):
    page.goto("/models/")
    page.fill("input[name=username]", "e2e-admin")
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def test_a_wrong_password_is_refused_with_a_message(page):
    log_in(page, password="not-the-password")
    assert page.get_by_role("alert").inner_text().startswith("Your username and password didn't match")
    assert "/login/" in page.url


def test_an_admin_logs_in_and_sees_the_deployed_model_served(page):
    log_in(page)
    page.wait_for_url("**/models/")
    row = page.locator("tr", has_text="tiny")
    assert "e2e (site-a)" in row.inner_text() and "serving" in row.inner_text()


def test_the_playground_streams_a_reply_from_the_model_and_logout_ends_the_session(page):
    log_in(page)
    page.wait_for_url("**/models/")
    page.click("text=Playground")
    page.select_option("#model", "tiny")
    page.fill("#max_tokens", "8")
    page.fill("#message", "Hello from the browser")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-done=true]")
    assert page.locator(".msg.user").inner_text() == "Hello from the browser"
    assert page.locator(".msg.assistant").inner_text().strip()
    assert page.locator("#chat-error").is_hidden()
    page.click("text=Log out")
    page.goto("/playground/")
    assert "/login/" in page.url


def test_the_residency_dry_run_says_whether_and_where_a_request_would_run(page):
    log_in(page)
    page.wait_for_url("**/models/")
    page.click("text=Residency")
    page.select_option("select[name=model]", "tiny")
    page.click("#dry-run button[type=submit]")
    result = page.locator("#dry-run-result").inner_text()
    assert "allowed" in result and "e2e at site-a" in result and "internal" in result
    page.select_option("select[name=data_class]", "restricted")
    page.click("#dry-run button[type=submit]")
    result = page.locator("#dry-run-result").inner_text()
    assert "denied" in result and "restricted" in result
