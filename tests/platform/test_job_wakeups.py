"""A request waiting for its job wakes when the worker commits (LISTEN/NOTIFY), not on the next poll."""

import threading
import time

import pytest
from django.db import connection

from citadel.audit.services import Actor
from citadel.jobs.models import InferenceJob
from citadel.jobs.selectors import Delta, Finished, job_follow
from citadel.jobs.services import job_append_chunk, job_claim, job_succeed
from citadel.jobs.wakeups import listener
from citadel.registry.services import deployment_create, model_register, pool_create

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def job(tmp_path):
    if connection.vendor != "postgresql":
        pytest.skip("LISTEN/NOTIFY needs PostgreSQL; SQLite polls")
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    model = model_register(name="m", path=str(tmp_path), actor=Actor.system())
    pool = pool_create(name="p", site="s", actor=Actor.system())
    deployment = deployment_create(model=model, pool=pool, actor=Actor.system())
    return InferenceJob.objects.create(kind="chat", model=model, deployment=deployment, pool=pool, payload={})


def test_a_followed_job_wakes_its_follower_at_each_commit_even_with_slow_polling(job, settings):
    settings.CITADEL_STREAM_POLL_SECONDS = settings.CITADEL_JOB_WAKEUP_CHECK_SECONDS = 5.0
    with listener.waiter(job.id):
        assert listener._connected.wait(10), "the listener did not connect"
    job_claim(job_id=job.id, worker_name="p@a")
    seen, done = [], threading.Event()

    def follow():
        for event in job_follow(job_id=job.id):
            seen.append((time.monotonic(), event))
        connection.close()
        done.set()

    thread = threading.Thread(target=follow)
    thread.start()
    time.sleep(0.5)  # the follower is waiting now
    written = time.monotonic()
    job_append_chunk(job=job, index=0, text="Hel")
    job_succeed(job=job, text="Hel", finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    assert done.wait(3), "the follower was not woken (it would have slept 5 s)"
    thread.join()
    assert [type(e) for _, e in seen] == [Delta, Finished] and seen[-1][1].job.status == "succeeded"
    assert seen[-1][0] - written < 1.0
