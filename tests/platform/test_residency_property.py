"""Property-based (hypothesis): for random sites, pools, deployments, policies and requests,
decide() never offers or picks a pool outside the policy, denies exactly when the policy allows
none of the model's pools, and through the API every request is dispatched only to an allowed
pool and every denial is audited; and a deployment is refused exactly when a team that uses the
model may not process one of its active keys' data classes at the pool's site.

The expected answer is computed here independently of the service, from the generated
scenario: a pool is allowed when it serves the model and its site is named by the policy or has
a (specified) jurisdiction the policy lists.
"""

import json

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import Client
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from citadel.accounts.services import api_key_create, team_create
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.jobs.models import InferenceJob
from citadel.registry.services import deployment_create, model_register, pool_create, worker_heartbeat
from citadel.residency.models import DataClass
from citadel.residency.services import decide, policy_create, site_create

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system()
JURISDICTIONS = ["EU", "US", "UK", "CH", "unspecified"]
CLASSES = ["public", "internal", "confidential", "restricted"]


MOSTLY = st.sampled_from([True, True, False])  # skewed so that admitted requests are common too


@st.composite
def scenarios(draw):
    n_sites = draw(st.integers(1, 4))
    sites = [draw(st.sampled_from(JURISDICTIONS)) for _ in range(n_sites)]
    n_pools = draw(st.integers(1, 5))
    pools = [{"site": draw(st.integers(0, n_sites - 1)), "deployed": draw(MOSTLY), "live": draw(MOSTLY)}
             for _ in range(n_pools)]
    policies = {}
    for data_class in CLASSES:
        if draw(MOSTLY):
            policies[data_class] = {
                "sites": sorted(draw(st.sets(st.integers(0, n_sites - 1), max_size=n_sites))),
                "jurisdictions": sorted(draw(st.sets(st.sampled_from(JURISDICTIONS[:-1]), max_size=3))),
                "fine_tuning": draw(st.booleans()),
            }
    request = {"data_class": draw(st.sampled_from(CLASSES)), "purpose": draw(st.sampled_from(["inference",
                                                                                                "fine_tuning"]))}
    team = draw(st.booleans())
    return {"sites": sites, "pools": pools, "policies": policies, "request": request, "team": team}


def build(scenario, model_path):
    """The scenario in the database; returns (model, team, key, pools by index)."""
    sites = [site_create(name=f"site-{i}", jurisdiction=j, actor=SYSTEM) for i, j in enumerate(scenario["sites"])]
    model = model_register(name="m", path=model_path, actor=SYSTEM)
    pools = []
    for i, spec in enumerate(scenario["pools"]):
        pool = pool_create(name=f"pool-{i}", site=sites[spec["site"]], actor=SYSTEM)
        if spec["deployed"]:
            deployment_create(model=model, pool=pool, actor=SYSTEM)
        if spec["live"]:
            worker_heartbeat(name=f"pool-{i}@h", pool_name=pool.name, hostname="h", pid=1, loaded_models=[])
        pools.append(pool)
    user = get_user_model().objects.create_user("u", password="x" * 16)
    team = team_create(name="t", members=[user], actor=SYSTEM) if scenario["team"] else None
    for name, spec in scenario["policies"].items():
        policy_create(team=team, data_class=DataClass.objects.get(name=name), actor=SYSTEM,
                      processing_sites=[sites[i] for i in spec["sites"]],
                      processing_jurisdictions=spec["jurisdictions"], fine_tuning_allowed=spec["fine_tuning"])
    # The least sensitive class on the key, so the request's header can name any class (raise it).
    key = api_key_create(user=user, name="k", team=team, data_class=DataClass.objects.get(name="public"),
                         actor=SYSTEM)
    return model, team, key, pools


def expected_pools(scenario) -> set[str]:
    """Names of the pools the request may use, worked out from the scenario alone."""
    policy = scenario["policies"].get(scenario["request"]["data_class"])
    if policy is None or (scenario["request"]["purpose"] == "fine_tuning" and not policy["fine_tuning"]):
        return set()
    allowed = set()
    for i, spec in enumerate(scenario["pools"]):
        jurisdiction = scenario["sites"][spec["site"]]
        by_name = spec["site"] in policy["sites"]
        by_jurisdiction = jurisdiction != "unspecified" and jurisdiction in policy["jurisdictions"]
        if spec["deployed"] and (by_name or by_jurisdiction):
            allowed.add(f"pool-{i}")
    return allowed


@pytest.fixture
def model_path(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    return str(tmp_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_decide_never_offers_a_pool_outside_the_policy_and_denies_when_nothing_is_allowed(scenario, model_path):
    with transaction.atomic():
        model, team, _, _ = build(scenario, model_path)
        data_class = DataClass.objects.get(name=scenario["request"]["data_class"])
        decision = decide(team=team, data_class=data_class, model=model, purpose=scenario["request"]["purpose"])
        expected = expected_pools(scenario)
        offered = {pool.name for pool in decision.pools}
        event("allowed" if decision.allowed else "denied")
        assert offered <= expected  # never a pool outside the policy
        if expected:
            assert decision.allowed and offered == expected and decision.pool.name in expected
        else:
            assert not decision.allowed and decision.pool is None and decision.reason
        transaction.set_rollback(True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_through_the_api_requests_go_only_to_allowed_pools_and_every_denial_is_audited(scenario, model_path):
    scenario["request"]["purpose"] = "inference"
    with transaction.atomic():
        _, _, key, _ = build(scenario, model_path)
        deployed = any(spec["deployed"] for spec in scenario["pools"])
        response = Client().post(
            "/v1/chat/completions",
            json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
            content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {key.key}",
            HTTP_X_CITADEL_DATA_CLASS=scenario["request"]["data_class"])
        expected = expected_pools(scenario)
        records = AuditRecord.objects.filter(action="inference.chat", request_id=response["X-Request-ID"])
        dispatched = InferenceJob.objects.filter(pool__isnull=False)
        event(f"status {response.status_code}")
        if not expected and deployed:
            assert response.status_code == 403
            assert records.get().outcome == "denied"
            assert records.get().details["residency"]["allowed"] is False
            assert not InferenceJob.objects.exists()
        elif expected:
            live = {f"pool-{i}" for i, spec in enumerate(scenario["pools"]) if spec["live"]}
            if expected & live:
                assert response.status_code == 200
                assert dispatched.get().pool.name in expected & live
                assert records.get().details["residency"]["pool"] in expected
            else:
                assert response.status_code == 503 and not dispatched.exists()
        else:  # deployed nowhere: not a residency question
            assert response.status_code == 503 and not dispatched.exists()
        transaction.set_rollback(True)


@st.composite
def placements(draw):
    """Teams (declared users of the model or not) with keys of some classes and policies, and
    the site a deployment would go to."""
    site = draw(st.sampled_from(JURISDICTIONS))
    teams = []
    for _ in range(draw(st.integers(0, 3))):
        classes = sorted(draw(st.sets(st.sampled_from(CLASSES), max_size=3)))
        policies = {c: {"by_name": draw(st.booleans()),
                        "jurisdictions": sorted(draw(st.sets(st.sampled_from(JURISDICTIONS[:-1]), max_size=2)))}
                    for c in CLASSES if draw(MOSTLY)}
        teams.append({"uses_model": draw(MOSTLY), "key_classes": classes, "policies": policies,
                      "revoked": draw(st.booleans())})
    return {"site": site, "teams": teams}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(placement=placements())
def test_a_deployment_is_refused_exactly_when_a_team_using_the_model_may_not_process_a_keys_class_there(
        placement, model_path):
    from citadel.accounts.services import api_key_revoke
    from citadel.residency.services import deployment_check

    with transaction.atomic():
        site = site_create(name="target", jurisdiction=placement["site"], actor=SYSTEM)
        pool = pool_create(name="p", site=site, actor=SYSTEM)
        model = model_register(name="m", path=model_path, actor=SYSTEM)
        user = get_user_model().objects.create_user("u", password="x" * 16)
        expected_ok = True
        for i, spec in enumerate(placement["teams"]):
            team = team_create(name=f"t{i}", members=[user], actor=SYSTEM)
            if spec["uses_model"]:
                model.teams.add(team)
            for c in spec["key_classes"]:
                key = api_key_create(user=user, name=c, team=team, data_class=DataClass.objects.get(name=c),
                                     actor=SYSTEM)
                if spec["revoked"]:
                    api_key_revoke(api_key=key.api_key, actor=SYSTEM)
            for c, rule in spec["policies"].items():
                policy_create(team=team, data_class=DataClass.objects.get(name=c), actor=SYSTEM,
                              processing_sites=[site] if rule["by_name"] else [],
                              processing_jurisdictions=rule["jurisdictions"])
            if spec["uses_model"] and not spec["revoked"]:
                for c in spec["key_classes"]:
                    rule = spec["policies"].get(c)
                    allowed = rule is not None and (rule["by_name"] or (
                        placement["site"] != "unspecified" and placement["site"] in rule["jurisdictions"]))
                    expected_ok = expected_ok and allowed
        problems = deployment_check(model=model, pool=pool)
        event("deployable" if not problems else "refused")
        assert (not problems) == expected_ok, problems
        transaction.set_rollback(True)
