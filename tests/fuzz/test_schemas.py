"""Fuzzing the running server against its own OpenAPI documents with schemathesis.

/api is described by drf-spectacular (/api/schema/) and fuzzed with a platform administrator's
console session (cookie and CSRF token, as the browser sends them); /v1 is described by
citadel/gateway/openapi_v1.yaml (/v1/openapi.json) and fuzzed with a real API key. Both run
against the real application with a real Celery worker (the live stack) on PostgreSQL and Redis,
valid and invalid inputs alike. What must hold: no server error (5xx), and every response that the
document describes matches it (status, content type, body schema).

The requests are made in this process, through the application's WSGI entry point (the one
gunicorn serves: schemathesis's WSGI transport), from a thread of their own: its database
connection is in autocommit as under gunicorn, outside the test's transaction, so every
middleware, view and commit runs as it does there and the worker process sees what they commit. That is several times faster than HTTP
through gunicorn, which is what makes the 1000-example run feasible; CITADEL_FUZZ_HTTP=1 sends
them to the live stack's gunicorn instead.

CITADEL_FUZZ_EXAMPLES sets the examples per operation: a few by default (the CI run), 1000 in
`make chaos`. CITADEL_FUZZ_OPERATIONS, a regular expression, keeps only the operations whose label
("GET /api/v1/keys/") it finds, so that a long run cut short can go on where it stopped.
"""

import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

EXAMPLES = int(os.environ.get("CITADEL_FUZZ_EXAMPLES", "5"))
OVER_HTTP = os.environ.get("CITADEL_FUZZ_HTTP", "") not in ("", "0")
OPERATIONS = re.compile(os.environ.get("CITADEL_FUZZ_OPERATIONS", ""))
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
# No shrinking and no example database: each failure is reported as generated, and nothing is
# written into the working tree.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 10, database=None,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))

# The django_db mark makes pytest-django create the test database the live stack runs on.
pytestmark = [pytest.mark.e2e, pytest.mark.fuzz, pytest.mark.django_db]


@pytest.fixture(scope="module")
def fuzz_session(live_stack, django_db_blocker):
    """A signed-in platform administrator's session on the live stack: cookies and the CSRF header."""
    from django.contrib.auth import get_user_model

    with django_db_blocker.unblock():
        get_user_model().objects.create_user("fuzz-admin", password="fuzz-admin-password-123", is_staff=True)
    client = httpx.Client(base_url=live_stack.base_url)
    page = client.get("/login/").text
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    signed_in = client.post("/login/", data={"username": "fuzz-admin", "password": "fuzz-admin-password-123",
                                             "csrfmiddlewaretoken": token})
    assert signed_in.status_code == 302, signed_in.text
    session = requests.Session()
    session.cookies.update(dict(client.cookies))
    session.headers["X-CSRFToken"] = client.cookies["csrftoken"]
    session.headers["Referer"] = live_stack.base_url + "/"
    return session


def _model_or_any(schema: dict, name: str) -> None:
    """Point half the generated `model` values at the deployed model, so requests reach the worker."""
    for item in schema["components"]["schemas"].values():
        for part in [item, *item.get("allOf", [])]:
            model = part.get("properties", {}).get("model")
            if model == {"type": "string"} and "model" in part.get("required", []):
                part["properties"]["model"] = {"anyOf": [{"const": name}, {"type": "string"}]}


@pytest.fixture(scope="module")
def application():
    """The WSGI application gunicorn serves, in this process."""
    from citadel.wsgi import application

    return application


def load(document: dict, application):
    """The schema, its requests sent in process to `application` unless CITADEL_FUZZ_HTTP is set."""
    schema = schemathesis.openapi.from_dict(document)
    if not OVER_HTTP:
        schema.app = application
    return schema


def in_own_thread(run) -> None:
    """Run `run` in a thread of its own, as a gunicorn thread would: its own database connection,
    committing for real (the test's transaction is this thread's), closed at the end."""
    def body():
        from django.db import connections

        try:
            run()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(body).result()


def _timed(call, label: str, calls: Counter, spent: Counter):
    """`call`, counting its calls and seconds under `label` (the run's summary line)."""
    def timed(case):
        began = time.monotonic()
        try:
            call(case)
        finally:
            calls[label] += 1
            spent[label] += time.monotonic() - began
    return timed


def fuzz(schema, call) -> None:
    """Every operation, valid and invalid inputs: collect each operation's failure, then report them all."""
    failures, calls, spent = [], Counter(), Counter()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        if not OPERATIONS.search(operation.label):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            timed = _timed(call, operation.label, calls, spent)

            @given(case=operation.as_strategy(generation_mode=mode))
            @FUZZ
            def run(case):
                timed(case)  # noqa: B023 - run() is called in this same iteration

            began, before = time.monotonic(), calls[operation.label]
            outcome = "ok"
            try:
                run()
            except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001 - gathered and reported below
                failures.append(f"{operation.label} ({mode.value}): {type(error).__name__}: {error}"[:3000])
                outcome = f"FAILED: {type(error).__name__}"
            # One line per operation as it ends, so that a long run shows its progress and findings.
            print(f"FUZZ {operation.label} ({mode.value}): {calls[operation.label] - before} calls in "
                  f"{time.monotonic() - began:.0f}s {outcome}", flush=True)
    took = time.monotonic() - started
    slowest = ", ".join(f"{label} {spent[label]:.0f}s/{calls[label]}" for label, _ in spent.most_common(5))
    print(f"\nFUZZ {'http' if OVER_HTTP else 'wsgi'} examples={EXAMPLES} operations={len(calls)} "
          f"calls={sum(calls.values())} took={took:.0f}s ({took / max(1, sum(calls.values())) * 1000:.0f} ms a call); "
          f"slowest: {slowest}", flush=True)
    assert not failures, f"{len(failures)} failing operations:\n\n" + "\n\n".join(failures)


def test_the_management_api_answers_generated_requests_without_a_server_error_and_as_documented(
        live_stack, fuzz_session, application):
    document = fuzz_session.get(f"{live_stack.base_url}/api/schema/", params={"format": "json"})
    assert document.status_code == 200, document.text
    schema = load(document.json(), application)
    if OVER_HTTP:
        fuzz(schema, lambda case: case.call_and_validate(base_url=live_stack.base_url, session=fuzz_session,
                                                         checks=CHECKS, timeout=120))
        return
    # The browser's session: its cookies, and the CSRF token its pages carry as a header.
    headers = {"X-CSRFToken": fuzz_session.headers["X-CSRFToken"], "Referer": "http://localhost/"}
    cookies = dict(fuzz_session.cookies.items())
    in_own_thread(lambda: fuzz(schema, lambda case: case.call_and_validate(headers=headers, cookies=cookies,
                                                                           checks=CHECKS)))


def test_the_openai_api_answers_generated_requests_without_a_server_error_and_as_documented(
        live_stack, application):
    document = httpx.get(f"{live_stack.v1}/openapi.json")
    assert document.status_code == 200, document.text
    body = document.json()
    _model_or_any(body, "tiny")
    schema = load(body, application)
    headers = {"Authorization": f"Bearer {live_stack.api_key}"}
    if OVER_HTTP:
        fuzz(schema, lambda case: case.call_and_validate(base_url=live_stack.base_url, headers=headers,
                                                         checks=CHECKS, timeout=180))
        return
    in_own_thread(lambda: fuzz(schema, lambda case: case.call_and_validate(headers=headers, checks=CHECKS)))
