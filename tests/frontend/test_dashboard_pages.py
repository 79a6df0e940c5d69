"""The console dashboard (Django test client): sites, pools and workers with their state and load,
deployed models, the user's running jobs (other teams' never shown), requests and tokens over time
as an SVG chart of the user's own usage, and the audit chain's status; plus the chart geometry.
"""

import re
from datetime import datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from citadel.accounts.models import Role, Team
from citadel.accounts.services import membership_set
from citadel.audit.models import AuditCheckpoint, AuditRecord
from citadel.audit.services import Actor, audit_record, checkpoint_create
from citadel.jobs.models import InferenceJob
from citadel.registry.models import Worker
from citadel.registry.services import deployment_create, model_register, pool_create
from citadel.usage.models import UsageRecord
from frontend.charts import Bucket, time_chart

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("test")


@pytest.fixture
def world(tmp_path):
    users = get_user_model().objects
    red, blue = Team.objects.create(name="red"), Team.objects.create(name="blue")
    found = {"root": users.create_user("root", password="x" * 16, is_staff=True), "red": red, "blue": blue}
    for name, team, role in (("erin", red, Role.ML_ENGINEER), ("audrey", red, Role.AUDITOR),
                             ("otto", red, Role.OPERATOR), ("app", red, Role.APPLICATION),
                             ("bob", blue, Role.ML_ENGINEER)):
        found[name] = users.create_user(name, password="x" * 16)
        membership_set(team=team, user=found[name], role=role, actor=SYSTEM)
    found["pool"] = pool_create(name="gpu-a", site="site-a", actor=SYSTEM)
    found["model"] = model_register(name="alpha", path=str(tmp_path / "alpha"), actor=SYSTEM)
    deployment_create(model=found["model"], pool=found["pool"], actor=SYSTEM)
    now = timezone.now()
    found["alive"] = Worker.objects.create(name="gpu@alive", pool=found["pool"], hostname="h1", pid=1,
                                           started_at=now, last_heartbeat=now, loaded_models=["/m"])
    found["stale"] = Worker.objects.create(name="gpu@stale", pool=found["pool"], hostname="h2", pid=2,
                                           started_at=now, last_heartbeat=now - timedelta(minutes=5))
    return found


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def text(response) -> str:
    return response.content.decode()


def job(world, *, user, team, status="running", worker="gpu@alive") -> InferenceJob:
    return InferenceJob.objects.create(kind="chat", model=world["model"], pool=world["pool"], user=user, team=team,
                                       payload={}, status=status, worker_name=worker)


@pytest.mark.parametrize("name", ["root", "erin", "audrey", "otto", "app"])
def test_every_role_gets_the_dashboard_at_the_root_and_at_its_own_address(world, name):
    client = signed_in(world[name])
    for url in ("/", "/dashboard/"):
        response = client.get(url)
        assert response.status_code == 200, (url, name)
        assert 'id="usage-chart"' in text(response)


def test_workers_show_alive_or_stale_by_heartbeat_with_their_load(world):
    job(world, user=world["erin"], team=world["red"])
    job(world, user=world["bob"], team=world["blue"])
    body = text(signed_in(world["erin"]).get("/dashboard/"))
    alive = re.search(rf'<tr id="worker-{world["alive"].pk}">.*?</tr>', body, re.S).group(0)
    stale = re.search(rf'<tr id="worker-{world["stale"].pk}">.*?</tr>', body, re.S).group(0)
    assert "state-alive" in alive and "2 running" in alive  # load counts every request on the worker
    assert "state-stale" in stale and "5 min ago" in stale
    assert 'id="alive-count">1<' in body and "1 stale" in body
    assert "<code>gpu-a</code>" in body and "site-a" in body
    assert '<a href="/models/alpha/">alpha</a>' in body and "live worker" in body
    assert 'hx-trigger="every 10s" hx-select="#workers"' in body  # the section refreshes itself


def test_running_jobs_are_the_users_teams_only(world):
    job(world, user=world["bob"], team=world["blue"])  # another team's
    job(world, user=world["erin"], team=world["red"], status="succeeded")  # finished
    body = text(signed_in(world["erin"]).get("/dashboard/"))
    assert "Inference (0)" in body and 'id="running-count">0<' in body
    job(world, user=world["erin"], team=world["red"], status="queued")
    body = text(signed_in(world["erin"]).get("/dashboard/"))
    assert "Inference (1)" in body and "queued</span> chat on alpha at gpu-a" in body
    assert "Inference (2)" in text(signed_in(world["root"]).get("/dashboard/"))  # platform admins see all


def test_the_chart_draws_the_users_usage_per_hour_and_per_day(world):
    UsageRecord.objects.create(kind="inference", source="job:1", team=world["red"], user=world["erin"],
                               model_name="alpha", requests=3, prompt_tokens=100, completion_tokens=20)
    UsageRecord.objects.create(kind="inference", source="job:2", team=world["blue"], user=world["bob"],
                               model_name="alpha", requests=7, prompt_tokens=5000, completion_tokens=5000)
    client = signed_in(world["erin"])
    day = text(client.get("/dashboard/"))
    assert 'data-requests="3" data-tokens="120"' in day  # blue's 7 requests are not erin's to see
    assert day.count('<rect class="bar-requests"') == 25  # the current hour and the 24 before it
    week = text(client.get("/dashboard/", {"window": "7d"}))
    assert 'data-requests="3"' in week and week.count('<rect class="bar-requests"') == 8
    assert 'data-requests="10"' in text(signed_in(world["root"]).get("/dashboard/"))
    wrong = text(client.get("/dashboard/", {"window": "forever"}))
    assert 'id="error-window" role="alert">window must be one of 24h, 7d, 30d' in wrong


def test_the_audit_chain_status_shows_the_newest_checkpoint_and_checks_its_signature(world):
    body = text(signed_in(world["audrey"]).get("/dashboard/"))
    assert "no checkpoint yet" in body and 'id="verify-button"' in body
    audit_record(actor=SYSTEM, action="thing.happen", outcome="success")
    checkpoint = checkpoint_create(force=True)
    audit_record(actor=SYSTEM, action="thing.after", outcome="success")
    body = text(signed_in(world["audrey"]).get("/dashboard/"))
    assert f"Newest checkpoint signs record #{checkpoint.sequence}" in body and "its signature verifies" in body
    head = AuditRecord.objects.order_by("-sequence").first().sequence
    unsigned = head - checkpoint.sequence
    assert unsigned >= 1 and f"{unsigned} record{'s' if unsigned > 1 else ''} since (head #{head})" in body
    # A forged checkpoint (the table takes inserts only): the newest one now, and its signature is wrong.
    AuditCheckpoint.objects.create(sequence=checkpoint.sequence, record_hash=checkpoint.record_hash,
                                   key_id=checkpoint.key_id, public_key=checkpoint.public_key,
                                   signature=checkpoint.signature[::-1])
    broken = text(signed_in(world["audrey"]).get("/dashboard/"))
    assert "check failed" in broken and "its signature does not verify" in broken
    assert 'id="verify-button"' not in text(signed_in(world["erin"]).get("/dashboard/"))  # not an auditor


def test_signed_out_visitors_are_sent_to_sign_in(world):
    response = Client().get("/dashboard/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_the_chart_geometry_scales_bars_and_line_to_round_axes():
    start = datetime(2026, 1, 1, 0, 0)
    chart = time_chart([Bucket(start + timedelta(hours=i), requests=r, tokens=t)
                        for i, (r, t) in enumerate([(0, 0), (5, 1000), (10, 2500)])], label_every=1)
    assert [tick for _, tick in chart.x_ticks] == ["00:00", "01:00", "02:00"]
    assert chart.requests_ticks[-1][1] == "10" and chart.tokens_ticks[-1][1] == "3k"
    assert chart.bars[0].height == 0 and chart.bars[2].height > chart.bars[1].height > 0
    assert chart.bars[2].y >= chart.top and len(chart.line.split()) == 3
    assert chart.total_requests == 15 and chart.total_tokens == 3500 and not chart.empty
    assert time_chart([]).empty
