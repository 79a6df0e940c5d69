"""Console pages answer a 503 page, not a 500, when PostgreSQL cannot be reached.

The Django process runs with DATABASE_URL pointing at a port where nothing listens: every
connection is refused, as while PostgreSQL restarts. (The chaos suite's PostgreSQL-restart test,
tests/chaos/test_service_restarts.py, stops a real server under load and shows the pages serving
again by themselves.) It runs in its own process so that pytest-django's database is untouched.
"""

import json
import os
import subprocess
import sys

from tests.live_stack import ROOT, free_port

PROBE = r'''
import json, re
import django
django.setup()
from django.test import Client

def seen(response):
    return {"status": response.status_code, "retry_after": response.get("Retry-After"),
            "type": response.get("Content-Type"), "body": response.content.decode(errors="replace")}

out = {}
browser = Client(SERVER_NAME="localhost", raise_request_exception=False, enforce_csrf_checks=True)
out["login_form"] = seen(browser.get("/login/"))
token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', out["login_form"]["body"]).group(1)
out["sign_in"] = seen(browser.post("/login/", {"username": "someone", "password": "a-password-1234",
                                               "csrfmiddlewaretoken": token}))
browser.cookies["sessionid"] = "abcdefghijklmnopqrstuvwxyz123456"  # a signed-in browser's cookie
for path in ("/", "/models/", "/account/", "/api/v1/models/"):
    out["session " + path] = seen(browser.get(path))
print("PROBE " + json.dumps(out))
'''


def test_console_pages_answer_a_503_page_without_a_trace_while_postgres_is_unreachable():
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="citadel.settings.test",
               DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/citadel",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "platform")]))
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    line = [x for x in done.stdout.splitlines() if x.startswith("PROBE ")]
    assert line, done.stdout + done.stderr
    seen = json.loads(line[0].removeprefix("PROBE "))
    assert seen["login_form"]["status"] == 200  # the form itself needs no database
    for name in ("sign_in", "session /", "session /models/", "session /account/"):
        page = seen[name]
        assert page["status"] == 503, (name, page)
        assert page["type"].startswith("text/html") and page["retry_after"] == "5", (name, page)
        assert 'id="database-unavailable"' in page["body"], (name, page)
        assert "Traceback" not in page["body"] and "OperationalError" not in page["body"], (name, page)
    api = seen["session /api/v1/models/"]
    assert api["status"] == 503 and api["retry_after"] == "5", api
    assert json.loads(api["body"])["code"] == "database_unavailable", api
