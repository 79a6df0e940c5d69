"""Restart the broker and the database under load (private instances: tests/chaos/services.py).

Redis restarted (without persistence, so the messages it held are gone): workers consume again
within 60 s, and every job committed to PostgreSQL still ends, its lost message sent again by the
reconciler. PostgreSQL stopped: the API answers 503 (never 500, never a hang) while it is down,
and so do console pages (a plain HTML page with Retry-After, no stack trace, for a signed-in
session and a sign-in alike); both serve again within 60 s of its return, every job ends,
and the audit chain verifies."""

import re
import threading
import time

import httpx
import pytest

from tests.chaos.stack import LEASE_SECONDS, check_no_duplicate_side_effects

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1200)]


class Load:
    """Chats sent back to back from a few threads until stopped; every outcome kept."""

    def __init__(self, stack, threads: int = 3):
        self.stack, self.stop_event, self.results = stack, threading.Event(), []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        seed = 50_000 + 1000 * index
        while not self.stop_event.is_set():
            seed += 1
            started = time.monotonic()
            try:
                outcome = self.stack.chat(seed, max_tokens=8, timeout=120).status_code
            except httpx.HTTPError as error:
                outcome = type(error).__name__
            self.results.append((outcome, time.monotonic() - started))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=180)

    def outcomes(self) -> dict:
        counts: dict = {}
        for outcome, _ in self.results:
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts


def _serving(stack, seed: int) -> bool:
    return stack.chat(seed, max_tokens=4, timeout=30).status_code == 200


def _console(stack) -> httpx.Client:
    """A browser's session on the console, signed in as the chaos user."""
    client = httpx.Client(base_url=stack.base_url, timeout=20)
    page = client.get("/login/").text
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    signed_in = client.post("/login/", data={"username": "chaos", "password": "chaos-password-123456",
                                             "csrfmiddlewaretoken": token})
    assert signed_in.status_code == 302, signed_in.text
    assert client.get("/").status_code == 200
    return client


def _console_page_while_down(response: httpx.Response) -> tuple:
    """A console page answered while PostgreSQL is down: the 503 page, nothing else."""
    assert response.status_code == 503, (response.status_code, response.text[:2000])
    assert response.headers["content-type"].startswith("text/html"), response.headers
    assert response.headers.get("Retry-After", "").isdigit(), response.headers
    assert 'id="database-unavailable"' in response.text and "Traceback" not in response.text, response.text
    return response.status_code, response.headers["Retry-After"]


def _all_jobs_end(stack) -> dict:
    stack.wait(lambda: not stack.sql("SELECT 1 FROM jobs_inferencejob WHERE status IN ('queued', 'running')"),
               LEASE_SECONDS + 300, "every job finishing", interval=1.0)
    return check_no_duplicate_side_effects(stack)


def test_workers_consume_again_within_60_s_of_a_redis_restart_and_no_committed_job_is_lost(redis_stack):
    stack = redis_stack
    with Load(stack) as load:
        time.sleep(5)
        stack.broker.restart(down_seconds=2)
        back = time.monotonic()
        stack.wait(lambda: _serving(stack, 90_001), 60, "a chat answered after the Redis restart", interval=0.5)
        consuming_after = time.monotonic() - back
    outcomes = load.outcomes()
    # Refused cleanly while the broker was away (503 broker_unavailable), never a server error or a hang.
    assert set(outcomes) <= {200, 503}, outcomes
    counts = _all_jobs_end(stack)
    print(f"\nCHAOS redis restart: consuming again after {consuming_after:.1f}s; load={outcomes} jobs={counts} "
          f"worker processes restarted by the supervisor={stack.restarts}")
    assert consuming_after < 60


def test_the_api_answers_503_while_postgres_is_down_and_serves_again_within_60_s(redis_stack):
    stack = redis_stack
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    console = _console(stack)
    with Load(stack) as load:
        time.sleep(5)
        stack.postgres.stop("fast")
        down, console_down = [], []
        try:
            for path in ("/", "/models/", "/account/"):  # a signed-in session: its middleware reads the session
                console_down.append(_console_page_while_down(console.get(path)))
            # The sign-in form itself needs no database; signing in does.
            with httpx.Client(base_url=stack.base_url, timeout=20) as anonymous:
                token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', anonymous.get("/login/").text)
                console_down.append(_console_page_while_down(anonymous.post(
                    "/login/", data={"username": "chaos", "password": "chaos-password-123456",
                                     "csrfmiddlewaretoken": token.group(1)})))
            for seed in range(3):
                for call in (lambda: httpx.get(f"{stack.base_url}/v1/models", headers=headers, timeout=20),
                             lambda seed=seed: stack.chat(91_000 + seed, max_tokens=4, timeout=20)):
                    started = time.monotonic()
                    response = call()
                    down.append((response.status_code, round(time.monotonic() - started, 1),
                                 response.headers.get("Retry-After")))
        finally:
            stack.postgres.start()
        back = time.monotonic()
        stack.wait(lambda: _serving(stack, 92_001), 60, "a chat answered after PostgreSQL came back", interval=0.5)
        serving_after = time.monotonic() - back
        stack.wait(lambda: console.get("/").status_code == 200, 60, "the console serving again", interval=0.5)
        console_after = time.monotonic() - back
    assert all(status == 503 for status, _, _ in down), down
    outcomes = load.outcomes()
    assert set(outcomes) <= {200, 503}, outcomes  # no 500, no request left hanging
    counts = _all_jobs_end(stack)
    verified = stack.citadel("audit", "verify", check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    print(f"\nCHAOS postgres restart: answers while down={down}; console while down={console_down}; serving again "
          f"after {serving_after:.1f}s (console {console_after:.1f}s); load={outcomes} jobs={counts}")
    assert serving_after < 60 and console_after < 60
