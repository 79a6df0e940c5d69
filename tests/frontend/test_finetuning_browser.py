"""Fine-tuning in the console, in a real Chromium against the live stack (gunicorn and a real Celery
worker): upload a malformed dataset and read its report, upload a good one, submit a job (first
with a bad rank), watch the loss curve grow while the worker really trains a LoRA adapter on the
tiny checkpoint, then open the playground with the fine-tuned model chosen and chat with it.
A second job is cancelled from its page."""

import json
from pathlib import Path

import pytest

from tests.frontend.chromium import chromium

pytestmark = [pytest.mark.browser, pytest.mark.django_db]

ROOT = Path(__file__).resolve().parents[2]
TRAIN_LINES = (ROOT / "models" / "demo-v4" / "finetune" / "train.jsonl").read_text().splitlines()
USER, PASSWORD = "ft-browser", "ft-browser-password-123"


@pytest.fixture(scope="module")
def finetuning_stack(live_stack, django_db_blocker, tmp_path_factory):
    """The live stack, with a storage path at its site, fine-tuning of internal data allowed for
    users without a team, and an ML engineer (no team, so no second factor) to sign in as."""
    from django.contrib.auth import get_user_model

    from citadel.audit.services import Actor
    from citadel.residency.models import Policy
    from citadel.residency.services import policy_update, site_update

    system = Actor.system("test")
    with django_db_blocker.unblock():
        policy = Policy.objects.get(team__isnull=True, data_class__name="internal")
        site_update(site=policy.storage_sites.get(), actor=system,
                    storage_path=str(tmp_path_factory.mktemp("ft-store")))
        policy_update(policy=policy, actor=system, fine_tuning_allowed=True)
        get_user_model().objects.create_user(USER, password=PASSWORD)
    return live_stack


@pytest.fixture(scope="module")
def browser(finetuning_stack):
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser, finetuning_stack):
    context = browser.new_context(base_url=finetuning_stack.base_url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto("/fine-tuning/")
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/fine-tuning/")
    yield page
    context.close()


def dataset(tmp_path, name: str, lines) -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# Notes the number of points on the curve now and after every change to the page (htmx swaps).
WATCH_CURVE = """() => {
  const size = () => Number(document.querySelector('#loss-chart polyline.series-train')?.dataset.count || 0);
  window.curveSizes = [size()];
  new MutationObserver(() => {
    const now = size();
    if (now !== window.curveSizes.at(-1)) window.curveSizes.push(now);
  }).observe(document.body, {childList: true, subtree: true});
}"""


def curve_points(page) -> int:
    count = page.locator("#loss-chart polyline.series-train").first
    return int(count.get_attribute("data-count")) if count.count() else 0


def submit_job(page, file_id: str, **fields) -> None:
    page.goto(f"/fine-tuning/jobs/new/?training_file={file_id}")
    page.select_option("#model", "tiny")
    for name, value in {"epochs": "1", "batch_size": "2", "checkpoint_every": "4", "eval_every": "0",
                        "seed": "3", **fields}.items():
        page.fill(f"#{name}", value)
    page.click("#submit-job")


def upload(page, path: str) -> None:
    page.goto("/fine-tuning/datasets/")
    page.set_input_files("#file", path)
    page.click("#upload")


def test_upload_report_job_form_live_loss_curve_and_the_playground_with_the_fine_tuned_model(page, tmp_path):
    page.click("text=Datasets")
    bad = [TRAIN_LINES[0], "{this is not json", TRAIN_LINES[1], json.dumps({"messages": []})]
    upload(page, dataset(tmp_path, "bad.jsonl", bad))
    page.wait_for_selector("#report-errors")
    assert "cannot be used for fine-tuning" in page.locator("#upload-result").inner_text()
    lines = page.locator("#report-errors tbody tr td:first-child").all_inner_texts()
    assert lines == ["2", "4"]

    upload(page, dataset(tmp_path, "prices.jsonl", TRAIN_LINES[:16]))
    page.wait_for_selector("#uploaded-id")
    assert "Ready for training" in page.locator("#upload-result").inner_text()
    assert page.locator("#report-examples").inner_text() == "16"
    file_id = page.locator("#uploaded-id").inner_text()
    assert page.locator(f"#files tr[data-file='{file_id}']").count() == 1  # the list was swapped in too

    submit_job(page, file_id, rank="0")
    assert "1 to 1024" in page.locator("#error-rank").inner_text()
    page.fill("#rank", "4")
    page.fill("#suffix", "browser")
    page.click("#submit-job")
    page.wait_for_url("**/fine-tuning/jobs/ftjob-*/")
    job_url = page.url

    page.evaluate(WATCH_CURVE)
    page.wait_for_selector("#job-live[data-status=succeeded]", timeout=300_000)
    seen = page.evaluate("window.curveSizes")
    assert page.url == job_url  # all of it arrived by htmx, without reloading the page
    # The curve grew while the page was open: 16 examples, batch 2, 1 epoch make 8 points at the end.
    assert seen == sorted(seen) and seen[0] < seen[-1] == curve_points(page) == 8, seen
    assert "Checkpoint saved at step 4" in page.locator("#job-events").inner_text()
    assert page.locator("#job-checkpoints tbody tr td:nth-child(2)").all_inner_texts()[-1] == "4"
    model = page.locator("#job-result code").inner_text()
    assert model.startswith("ft:tiny:browser:")

    page.click("#try-in-playground")
    page.wait_for_url("**/playground/?model=*")
    assert page.eval_on_selector("#model", "select => select.value") == model
    page.fill("#max_tokens", "4")
    page.fill("#message", "What's the list price of the Mistral Barometer?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-done=true]", timeout=120_000)
    assert page.locator("#chat-error").is_hidden()


def test_a_job_is_cancelled_from_its_page_after_a_confirmation(page, tmp_path):
    upload(page, dataset(tmp_path, "more.jsonl", TRAIN_LINES[16:80]))
    page.wait_for_selector("#uploaded-id")
    submit_job(page, page.locator("#uploaded-id").inner_text(), epochs="3", checkpoint_every="0")
    page.wait_for_url("**/fine-tuning/jobs/ftjob-*/")
    dialogs = []
    page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.click("#cancel-job")
    assert dialogs and "Cancel fine-tuning job" in dialogs[0]
    assert page.locator("#job-live").get_attribute("data-status") in ("queued", "running")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel-job")
    page.wait_for_selector("#job-live[data-status=cancelled]")
    assert "Job cancelled" in page.locator("#job-events").inner_text()
    assert page.locator("#cancel-job").count() == 0
