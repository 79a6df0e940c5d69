"""`inference.LLM` over the native engine: streams from several threads share batches, results
stay what one request alone gives, a failing step or an abandoned stream harms nobody else, and
bad input is refused with an error that names the problem.
"""

import subprocess
import sys
import threading
import time

import pytest

from inference import LLM, SamplingParams
from inference.engine.loop import EngineFailure
from inference.engine.model_runner import ModelRunner
from tests.inference.test_qwen3_moe_model import build_qwen3_moe_checkpoint

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

PROMPT = "The old citadel stood on a hill above the river, and every morning the keepers opened its gates."


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    return build_qwen3_moe_checkpoint(tmp_path_factory.mktemp("qwen3-moe-llm"), tiny_checkpoint, seed=3)


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = LLM(checkpoint, device="cpu", dtype="float32")
    yield engine
    engine.close()


def wait_until_idle(llm, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = llm.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.01)
    raise AssertionError(f"the engine still has work after {timeout}s: {llm.stats()}")


def test_concurrent_streams_from_threads_are_batched_and_each_gets_its_own_text(llm):
    params = [SamplingParams(seed=s, temperature=0.8, max_tokens=24, ignore_eos=True) for s in range(4)]
    prompts = [PROMPT, "Hello", "What is two plus two?", "Tell me a story about the sea."]
    expected = [llm.generate(p, sp)[0].text for p, sp in zip(prompts, params, strict=True)]
    results: dict[int, str] = {}
    start = threading.Barrier(4)
    before = llm.stats()["batch_sizes"]

    def worker(i):
        start.wait()
        results[i] = "".join(event.text for event in llm.stream(prompts[i], params[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert [results[i] for i in range(4)] == expected
    after = llm.stats()["batch_sizes"]
    batched_steps = sum(count - before.get(size, 0) for size, count in after.items() if size > 1)
    assert batched_steps >= 10  # the four streams shared most of their steps


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=3, max_tokens=20, stop=["e", "an"], logprobs=2),
    ],
    ids=["greedy", "sampled with stop strings and logprobs"],
)
def test_streamed_events_add_up_to_the_generated_output(llm, params):
    expected = llm.generate(PROMPT, params)[0]
    events = list(llm.stream(PROMPT, params))
    assert "".join(e.text for e in events) == expected.text
    assert [t for e in events for t in e.token_ids] == expected.token_ids
    assert events[-1].finish_reason == expected.finish_reason
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    if params.logprobs is not None:
        assert [lp for e in events for lp in e.logprobs] == expected.logprobs


def test_stop_token_ids_and_max_tokens_end_requests_in_a_batch(llm):
    full = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop_token = full.token_ids[4]
    outputs = llm.generate(
        [PROMPT, PROMPT],
        [
            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_token]),
            SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
        ],
    )
    assert outputs[0].token_ids == full.token_ids[: full.token_ids.index(stop_token) + 1]
    assert (outputs[0].finish_reason, outputs[0].outputs[0].stop_reason) == ("stop", stop_token)
    assert (outputs[1].token_ids, outputs[1].finish_reason) == (full.token_ids[:3], "length")


def test_the_checkpoints_eos_token_ends_generation_unless_ignore_eos(llm, tiny_checkpoint, tmp_path):
    first = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1))[0].token_ids[0]
    folder = build_qwen3_moe_checkpoint(tmp_path / "eos", tiny_checkpoint, seed=3, eos_token_id=first)
    eos_llm = LLM(folder, device="cpu")
    try:
        stopped = eos_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5))[0]
        ignored = eos_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    finally:
        eos_llm.close()
    assert (stopped.token_ids, stopped.finish_reason, stopped.text) == ([first], "stop", "")
    assert len(ignored.token_ids) == 5


def test_a_stream_closed_early_frees_its_place_in_the_batch(llm):
    stream = llm.stream(PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    next(stream)
    next(stream)
    stream.close()
    stats = wait_until_idle(llm)
    assert stats["kv_pages_free"] == stats["kv_pages_total"]


def test_the_engine_thread_loads_the_model_and_steps_it(llm):
    """All of the model's work runs in the loop thread (see engine/loop.py for why it matters on a CPU)."""
    threads = []
    original = ModelRunner.execute

    def execute(self, batch):
        threads.append(threading.current_thread().name)
        return original(self, batch)

    ModelRunner.execute = execute
    try:
        llm.generate(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))
    finally:
        ModelRunner.execute = original
    assert set(threads) == {"citadel-engine"}
    assert next(llm._loop.engine.runner.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("dropped", ["at exit", "before exit"])
def test_an_llm_never_closed_lets_the_interpreter_exit_cleanly(checkpoint, dropped):
    """A script that never calls close() exits normally, whether the LLM is still referenced at exit
    (the loop is closed then) or was garbage-collected mid-stream before (its loop is joined at exit)."""
    body = (
        f"llm = LLM({str(checkpoint)!r}, device='cpu')\n"
        "stream = llm.stream('hello', SamplingParams(max_tokens=200, ignore_eos=True))\n"
        "next(stream)\n"
        "print('first token received', flush=True)\n"
    )
    if dropped == "before exit":
        body = "def run():\n" + "".join(f"    {line}\n" for line in body.splitlines()) + "run()\n"
    script = "from inference import LLM, SamplingParams\n" + body
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "first token received" in done.stdout
    assert "terminate" not in done.stderr and "Fatal" not in done.stderr


def test_a_failing_step_fails_the_requests_in_flight_and_the_engine_serves_the_next_ones(llm, monkeypatch):
    original = ModelRunner.execute
    failures = iter([True])

    def execute(self, batch):
        if next(failures, False):
            raise RuntimeError("simulated device fault")
        return original(self, batch)

    monkeypatch.setattr(ModelRunner, "execute", execute)
    with pytest.raises(EngineFailure, match="simulated device fault"):
        llm.generate(PROMPT, SamplingParams(max_tokens=4))
    assert len(llm.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4
    stats = wait_until_idle(llm)
    assert stats["kv_pages_free"] == stats["kv_pages_total"]


def test_submit_all_wakes_its_caller_once_after_the_last_sequence_and_sends_no_token_events(llm):
    seqs = [llm._new_sequence(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in (("Hello", 3), ("Hi", 7))]
    finished = llm._loop.submit_all(seqs)
    assert finished.get(timeout=120) is None
    assert [len(s.to_output().token_ids) for s in seqs] == [3, 7]
    assert finished.empty()  # one item for the whole group: nothing per token, nothing per sequence


def test_stats_report_steps_batch_sizes_and_cache_pages(llm):
    llm.generate(["Hello", "Hi there"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    stats = llm.stats()
    assert stats["backend"] == "citadel"
    for key in (
        "steps",
        "last_batch_size",
        "max_batch_size",
        "mean_batch_size",
        "batch_sizes",
        "prefill_tokens",
        "decode_tokens",
        "preemptions",
        "running",
        "waiting",
        "kv_pages_free",
    ):
        assert key in stats
    assert stats["max_batch_size"] >= 2


# -- bad input -------------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_context_is_refused(llm):
    with pytest.raises(ValueError, match="holds at most 512: shorten the prompt"):
        llm.generate([[5] * 512])


def test_the_context_is_capped_by_what_the_cache_can_hold(checkpoint):
    small = LLM(checkpoint, device="cpu", kv_cache_memory=5 * 12288)  # 4 usable pages of 16 tokens
    try:
        assert small.max_model_len == 64
        with pytest.raises(ValueError, match="holds at most 64"):
            small.generate([[5] * 64])
        out = small.generate([[5] * 60], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
        assert (len(out.token_ids), out.finish_reason) == (4, "length")
    finally:
        small.close()


def test_out_of_vocabulary_token_ids_are_refused(llm):
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 640\)"):
        llm.generate([[1, 2, 640]])


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        (dict(max_num_seqs=0), ValueError, "max_num_seqs must be an integer >= 1"),
        (dict(block_size="16"), ValueError, "block_size must be an integer >= 1"),
        (dict(kv_cache_memory=100), ValueError, "holds no cache page"),
        (dict(max_batch_tokens=5), TypeError, "unknown engine setting.*max_batch_tokens"),
    ],
)
def test_bad_engine_settings_are_refused_with_the_setting_named(checkpoint, settings, error, message):
    with pytest.raises(error, match=message):
        LLM(checkpoint, device="cpu", **settings)


def test_bad_sampling_values_are_refused_before_anything_runs(llm):
    steps = llm.stats()["steps"]
    with pytest.raises(ValueError, match="temperature"):
        llm.generate(PROMPT, SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="got 2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()])
    assert llm.stats()["steps"] == steps
