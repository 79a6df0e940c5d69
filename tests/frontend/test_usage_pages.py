"""Console usage pages (Django test client): totals, an SVG bar per group, the CSV download, grouping and
measure choices, and team scoping (a member sees their team's usage only; an administrator all)."""

import csv
import io

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from citadel.accounts.models import Role, Team
from citadel.accounts.services import membership_set
from citadel.audit.services import Actor
from citadel.usage.services import usage_record
from frontend.views_usage import bar_chart

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("test")


@pytest.fixture
def usage():
    users = get_user_model().objects
    red, blue = Team.objects.create(name="red"), Team.objects.create(name="blue")
    alice = users.create_user("alice", password="x" * 16)
    membership_set(team=red, user=alice, role=Role.ML_ENGINEER, actor=SYSTEM)
    usage_record(kind="inference", source="job:1", model_name="demo-v4", team_id=red.pk, prompt_tokens=30,
                 completion_tokens=12)
    usage_record(kind="batch", source="batch:1", model_name="demo-v4", team_id=red.pk, requests=5,
                 prompt_tokens=100, completion_tokens=50)
    usage_record(kind="fine_tuning", source="ftjob:1", model_name="demo-v4", team_id=red.pk, gpu_seconds=42.5)
    usage_record(kind="inference", source="job:2", model_name="other", team_id=blue.pk, prompt_tokens=999,
                 completion_tokens=1)
    admin = users.create_user("root", password="x" * 16, is_staff=True, is_superuser=True)
    return {"alice": alice, "admin": admin}


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_a_member_sees_their_teams_totals_a_bar_per_group_and_not_other_teams(usage):
    page = signed_in(usage["alice"]).get("/usage/?by=kind").content.decode()
    assert "7 requests" in page and "130 prompt tokens" in page and "192 tokens in all" in page
    assert "42.5 fine-tuning GPU-seconds" in page
    assert page.count('<g class="bar">') == 3 + 1  # three kinds, one day
    assert "<title>batch: 150</title>" in page
    assert "<td>blue</td>" not in page and "<td>999</td>" not in page and "1000" not in page
    assert 'href="/usage/"' in page  # in the navigation


def test_an_administrator_sees_every_team_and_can_chart_gpu_seconds(usage):
    page = signed_in(usage["admin"]).get("/usage/?by=team&metric=gpu_seconds").content.decode()
    assert "<td>blue</td>" in page and "<td>red</td>" in page
    assert "<title>red: 42.5</title>" in page


def test_the_csv_download_has_the_rows_the_page_shows(usage):
    response = signed_in(usage["alice"]).get("/usage/export.csv?days=7")
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert {row["kind"] for row in rows} == {"inference", "batch", "fine_tuning"}
    assert sum(int(row["total_tokens"]) for row in rows) == 192 and {row["team"] for row in rows} == {"red"}


def test_an_unknown_grouping_is_refused_on_the_page_and_anonymous_users_sign_in_first(usage):
    assert signed_in(usage["alice"]).get("/usage/?by=colour").status_code == 400
    assert Client().get("/usage/").status_code == 302


def test_bars_are_scaled_to_the_largest_value():
    from citadel.usage.selectors import UsageRow

    chart = bar_chart([UsageRow("a", 1, 50, 50, 0.0), UsageRow("b", 1, 25, 25, 0.0)], "tokens")
    assert chart.bars[0].height == pytest.approx(2 * chart.bars[1].height, abs=0.1)
    assert chart.bars[0].prompt_height == pytest.approx(chart.bars[0].height / 2, abs=0.1)
    assert chart.ticks[-1][1] == "100"
