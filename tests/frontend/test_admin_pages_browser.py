"""The dashboard, audit and models pages in a real Chromium against the live stack (gunicorn and a
real Celery worker serving `tiny`): verify the audit chain from the audit page (htmx swaps the result
in under the strict Content-Security-Policy), and deploy the model to a second pool with engine
settings, watch its live status, then undeploy it through the confirmation page; import the tiny
checkpoint again under a new name and watch the stack's worker hash and register it."""


import pytest

from tests.frontend.chromium import chromium

pytestmark = [pytest.mark.browser, pytest.mark.django_db]
USER, PASSWORD = "e2e-admin", "e2e-admin-password-123"  # the live stack's platform administrator
SECOND_POOL = "browser-b"


@pytest.fixture(scope="module")
def admin_stack(live_stack, django_db_blocker):
    """The live stack plus a second pool at the same site (committed, so gunicorn sees it)."""
    from citadel.audit.services import Actor
    from citadel.registry.services import pool_create

    with django_db_blocker.unblock():
        pool_create(name=SECOND_POOL, site="site-a", actor=Actor.system("test"))
    return live_stack


@pytest.fixture(scope="module")
def browser(admin_stack):
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser, admin_stack):
    context = browser.new_context(base_url=admin_stack.base_url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.csp_errors = errors
    yield page
    context.close()


def log_in(page, path: str) -> None:
    page.goto(path)
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"**{path}")


def fits_narrow(page) -> None:
    """In a phone-wide window the page does not scroll sideways (wide tables scroll inside their box)."""
    page.set_viewport_size({"width": 380, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), page.url
    page.set_viewport_size({"width": 1280, "height": 800})


def test_an_administrator_verifies_the_audit_chain_from_the_audit_page(page):
    log_in(page, "/audit/")
    assert page.locator("#audit-records tbody tr").count() >= 1
    page.click("#verify-button")
    result = page.locator("#verify-slot #verify-result")
    result.wait_for()
    assert "Verified." in result.inner_text() and "records" in result.inner_text()
    assert page.url.endswith("/audit/")  # swapped in by htmx, no page load
    page.fill("#action", "audit.verify")
    page.click("#audit-filters button[type=submit]")
    assert "audit.verify" in page.locator("#audit-records").inner_text()  # the check itself is on the record
    fits_narrow(page)
    assert not [e for e in page.csp_errors if "Content Security Policy" in e], page.csp_errors


def test_an_administrator_deploys_the_model_to_a_second_pool_and_undeploys_it(page):
    log_in(page, "/models/tiny/")
    page.select_option("#deploy-pool", SECOND_POOL)
    page.fill("#device", "cpu")
    page.fill("#kv_host_bytes", "64M")  # refused: a host tier needs the device tier's budget
    page.click("#deploy-button")
    assert "needs kv_device_bytes" in page.locator("#error-kv_host_bytes").inner_text()
    page.fill("#kv_device_bytes", "32M")
    page.fill("#max_num_seqs", "8")
    page.click("#deploy-button")
    page.wait_for_url("**/models/tiny/")
    row = page.locator("#deployments tr[data-status=active]", has_text=SECOND_POOL)
    assert "kv_device_bytes=33554432" in row.inner_text() and "max_num_seqs=8" in row.inner_text()
    # No worker consumes the new pool's queue: its live status says so (and keeps polling).
    assert "no live worker" in row.locator(".live").inner_text()

    row.get_by_role("link", name="Undeploy").click()
    page.wait_for_url("**/undeploy/")
    assert SECOND_POOL in page.locator("h1").inner_text()
    page.click("#confirm-undeploy button[type=submit]")
    page.wait_for_url("**/models/tiny/")
    assert page.locator("#deployments tr[data-status=active]", has_text=SECOND_POOL).count() == 0
    retired = page.locator("#deployments tr[data-status=retired]", has_text=SECOND_POOL)
    assert "retired" in retired.inner_text()
    serving = page.locator("#deployments tr[data-status=active]", has_text="e2e")
    serving.locator(".live", has_text="serving").wait_for()  # the stack's own deployment is untouched
    fits_narrow(page)
    assert not [e for e in page.csp_errors if "Content Security Policy" in e], page.csp_errors


def test_the_dashboard_shows_the_live_worker_and_the_deployment(page):
    log_in(page, "/dashboard/")
    assert "alive" in page.locator("#worker-table").inner_text()
    assert "tiny" in page.locator("#deployed").inner_text()
    assert page.locator("#usage-chart").is_visible()
    with page.expect_response(lambda r: r.url.endswith("/dashboard/") and r.request.headers.get("hx-request") == "true",
                              timeout=30_000):
        pass  # the workers section fetches itself again within 10 s
    page.wait_for_timeout(500)
    assert page.locator("#workers").count() == 1 and "alive" in page.locator("#worker-table").inner_text()
    fits_narrow(page)


def test_an_administrator_imports_a_folder_and_the_pools_worker_verifies_and_registers_it(page, tiny_checkpoint):
    import hashlib
    from pathlib import Path

    weights = sorted(Path(tiny_checkpoint).glob("*.safetensors"))
    sums = "\n".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in weights)
    log_in(page, "/models/")
    page.fill("#import-name", "tiny-again")
    page.fill("#import-path", str(tiny_checkpoint))
    page.select_option("#import-pool", "e2e")
    page.fill("#import-checksums", sums)
    page.click("#import-button")
    page.wait_for_url("**/models/imports/*/")
    # The progress block polls itself until the worker of pool e2e has finished.
    page.locator(".import-progress[data-status=succeeded]").wait_for(timeout=120_000)
    text = page.locator(".import-progress").inner_text()
    assert "Registered tiny-again" in text and "against the expected checksums" in text and "100%" in text
    page.click(".import-progress a[href=\"/models/tiny-again/\"]")
    page.wait_for_url("**/models/tiny-again/")
    assert "files with their SHA-256" in page.locator("details summary").inner_text()
    assert weights[0].name in page.locator("details").text_content()
