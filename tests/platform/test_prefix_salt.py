"""The prefix-cache salt of a job comes from its API key's team, on the server, never from the client.

Jobs are made as the gateway makes them (team and key from the API key that authenticated the
request); the engine end of the test runs the worker's real call site (tasks._events) on a real
engine over models/demo-v4, and reads its prefix-cache counters: keys of one team share cached
prefixes, another team's key does not.
"""

from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from citadel.accounts.services import api_key_create, team_create
from citadel.audit.services import Actor
from citadel.gateway.serializers import ChatCompletionInput, CompletionInput
from citadel.jobs import tasks
from citadel.jobs.models import InferenceJob
from citadel.jobs.prefix_salt import job_cache_salt
from citadel.registry.services import deployment_create, model_register, pool_create

pytestmark = pytest.mark.django_db

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo-v4"
PROMPT = " ".join(
    f"Rule {n}: the keepers of the citadel open the gates at dawn, count the visitors, and write "
    "every question and every answer in the ledger before the lamps are lit." for n in range(1, 9)
)


@pytest.fixture
def keys():
    """Two keys of team A (two members), one key of team B, one key without a team."""
    users = [get_user_model().objects.create_user(f"salt{n}", password="x" * 16) for n in range(3)]
    team_a = team_create(name="team-a", actor=Actor.system(), members=users[:2])
    team_b = team_create(name="team-b", actor=Actor.system(), members=users[2:])
    make = lambda user, team, name: api_key_create(user=user, name=name, actor=Actor.system(), team=team).api_key  # noqa: E731
    return {
        "a1": make(users[0], team_a, "a1"),
        "a2": make(users[1], team_a, "a2"),
        "b": make(users[2], team_b, "b"),
        "none": make(users[0], None, "none"),
    }


@pytest.fixture
def make_job(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    model = model_register(name="m", path=str(tmp_path), actor=Actor.system())
    pool = pool_create(name="p", site="s", actor=Actor.system())
    deployment = deployment_create(model=model, pool=pool, actor=Actor.system())

    def make(key, payload=None):
        """A completion job as the gateway records it for a request authenticated with `key`."""
        return InferenceJob.objects.create(
            kind="completion", model=model, deployment=deployment, pool=pool, api_key=key, team=key.team,
            payload=payload or {"prompt": PROMPT, "sampling": {"max_tokens": 2, "temperature": 0}},
        )

    return make


def test_two_keys_of_one_team_share_a_salt_and_another_team_has_its_own(keys, make_job):
    salts = {name: job_cache_salt(make_job(key)) for name, key in keys.items()}
    assert salts["a1"] == salts["a2"]
    assert len({salts["a1"], salts["b"], salts["none"]}) == 3
    assert all(len(s) == 64 for s in salts.values())  # an HMAC-SHA256 in hex: it names no team


def test_a_job_without_a_team_or_key_has_no_salt(make_job, keys):
    job = make_job(keys["a1"])
    job.team, job.api_key = None, None
    assert job_cache_salt(job) is None


def test_the_salt_depends_on_the_servers_secret_key(keys, make_job, settings):
    job = make_job(keys["a1"])
    before = job_cache_salt(job)
    settings.SECRET_KEY = "another-secret-key-" + "x" * 40
    assert job_cache_salt(job) != before


def test_a_cache_salt_in_the_request_body_is_dropped_and_cannot_choose_the_namespace(keys, make_job):
    for serializer, body in (
        (ChatCompletionInput, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        (CompletionInput, {"model": "m", "prompt": "hi"}),
    ):
        checked = serializer(data={**body, "cache_salt": "team-b-guess"})
        assert checked.is_valid(), checked.errors
        assert "cache_salt" not in checked.validated_data
    # Even a payload that carried one gets the team's salt, not the payload's.
    forged = make_job(keys["a1"], {"prompt": PROMPT, "cache_salt": job_cache_salt(make_job(keys["b"])),
                                   "sampling": {"max_tokens": 2}})
    assert job_cache_salt(forged) == job_cache_salt(make_job(keys["a2"]))


def test_the_worker_passes_the_salt_so_only_the_same_team_hits_the_cached_prefix(keys, make_job):
    from inference import LLM

    llm = LLM(model=DEMO, device="cpu", dtype="float32", block_size=4, enable_prefix_caching=True)

    def hits_for(key) -> int:
        before = llm.stats()["prefix_hits"]
        for _ in tasks._events(llm, make_job(key)):
            pass
        return llm.stats()["prefix_hits"] - before

    try:
        assert llm.count_tokens(PROMPT) > 2 * llm.stats()["prefix_block_tokens"]
        assert hits_for(keys["a1"]) == 0
        assert hits_for(keys["b"]) == 0  # another team: computed again
        assert hits_for(keys["a2"]) > 0  # the same team's other key reuses team A's blocks
        assert hits_for(keys["none"]) == 0
    finally:
        llm.close()


def test_a_batch_is_salted_with_its_team_like_the_teams_single_requests(keys, make_job):
    """Batch lines run through llm.chat/generate (citadel.batches.tasks._run_chunk) with the salt of
    the batch's team, so a batch never shares cached prefixes with another team's requests."""
    from types import SimpleNamespace

    from citadel.batches import tasks as batch_tasks
    from citadel.batches.models import Batch

    seen = []

    class RecordingEngine:
        def generate(self, prompts, params, lora_request=None, cache_salt=None):
            seen.append(cache_salt)
            return [SimpleNamespace(text="ok", finish_reason="length", prompt_token_ids=[1], token_ids=[2])
                    for _ in prompts]

    job = make_job(keys["a1"])
    batch = SimpleNamespace(team_id=job.team_id, api_key_id=keys["a2"].pk, adapter=None,
                            endpoint=Batch.Endpoint.COMPLETIONS, model=job.model)
    line = SimpleNamespace(pk=1, payload={"prompt": "hello", "sampling": {"max_tokens": 1}})
    results = batch_tasks._run_chunk(RecordingEngine(), batch, [line])
    assert results[1]["text"] == "ok"
    assert seen == [job_cache_salt(job)] and seen[0] is not None
    assert seen[0] != job_cache_salt(make_job(keys["b"]))
