"""`make run`'s path: migrate, bootstrap and `citadel serve` on embedded defaults (SQLite, the
filesystem Celery transport, no external service), answering the openai client."""

import os
import signal
import stat
import subprocess
import sys

import httpx
import openai
import pytest

from tests.live_stack import ROOT, free_port, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def embedded_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL",
                                                            "DJANGO_SECRET_KEY")}
    env.update(DJANGO_SETTINGS_MODULE="citadel.settings.local", CITADEL_DATA_DIR=str(tmp_path / "var"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT)]))
    return env


def citadel(env, *args, **kwargs):
    return subprocess.run([sys.executable, "-m", "citadel.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, **kwargs)


def test_first_run_creates_the_admin_once_and_serves_the_demo_model(embedded_env, tmp_path):
    assert citadel(embedded_env, "migrate", "--noinput").returncode == 0
    first = citadel(embedded_env, "bootstrap", check=True)
    assert "Created admin account 'admin' with password:" in first.stdout
    password_file = tmp_path / "var" / "admin-password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert password_file.read_text().strip() in first.stdout
    assert "password" not in citadel(embedded_env, "bootstrap", check=True).stdout  # printed once only

    key = citadel(embedded_env, "keys", "create", "--user", "admin", "--name", "t", check=True).stdout
    key = key.strip().splitlines()[-1]
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([sys.executable, "-m", "citadel.cli", "serve", "--port", str(port)], env=embedded_env,
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 60, "citadel serve ready")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=2, timeout=120)
        assert [m.id for m in client.models.list()] == ["citadel-demo"]
        # The worker may still be loading the model: the request waits for it rather than failing.
        wait_until(lambda: "online" in httpx.get(f"{base}/api/v1/workers/",
                                                 headers={"Authorization": f"Bearer {key}"}).text, 60, "worker")
        reply = client.chat.completions.create(model="citadel-demo", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=5, temperature=0)
        assert reply.choices[0].message.content and reply.usage.completion_tokens <= 5
        stream = client.chat.completions.create(model="citadel-demo", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == reply.choices[0].message.content
        assert httpx.get(f"{base}/login/").status_code == 200
    finally:
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=40) == 0, (tmp_path / "serve.log").read_text()[-3000:]
