"""Citadel's DeepSeek-V4 against transformers' DeepseekV4ForCausalLM on the same weights.

transformers is the oracle: prompt log-probabilities must agree to 1e-3 in float32 and greedy
decoding must be token-identical, whether sequences run alone, batched, or prefilled in chunks
next to other sequences' decodes. The model runs through the engine's own ModelRunner,
BlockManager and cache (so it is tested on the structures it is served with), but with steps made
by hand: which sequence feeds how many tokens at each step is chosen here, not by the scheduler.
transformers ignores the attention mask of left-padded batches, so it always runs one unpadded
sequence at a time here.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, GenerationConfig

from inference import SamplingParams
from inference.detokenizer import IncrementalDetokenizer
from inference.engine import EngineConfig, Sequence
from inference.engine.model_runner import ModelRunner
from inference.engine.scheduler import ScheduledBatch
from inference.engine.weights import CheckpointError
from inference.loader import load_tokenizer
from inference.models import load_model
from inference.models.deepseek_v4_cache import V4CacheLayout

PROMPT_LENGTHS = [1, 3, 5, 17, 40, 100]  # around the windows (16 / 6) and the rates (4, 8 / 2, 4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy sizes gain nothing from intra-op threads, and on a busy 2-core machine they cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def v4(folder: Path, dtype=torch.float32):
    return load_model(folder, AutoConfig.from_pretrained(folder), torch.device("cpu"), dtype)


def random_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(7, vocab, (n,), generator=generator).tolist() for n in lengths]


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(dim=-1)


class Steps:
    """The engine's ModelRunner and BlockManager over `model`, stepped by hand.

    Small pages (4 entries) so that 100-token prompts span several pages of each group.
    """

    def __init__(self, model, tokenizer, **settings):
        config = EngineConfig(**{"block_size": 4, "max_num_seqs": 16, "kv_cache_memory": 1 << 24, **settings})
        self.runner = ModelRunner(model, config, torch.device("cpu"))
        self.manager = self.runner.block_manager
        self.tokenizer = tokenizer
        self._ids = itertools.count()

    def add(self, prompt: list[int]) -> Sequence:
        # prompt_logprobs makes the runner return the logits of every prompt row, not just the last.
        params = SamplingParams(temperature=0, max_tokens=1000, prompt_logprobs=0)
        return Sequence(str(next(self._ids)), None, prompt, params, IncrementalDetokenizer(self.tokenizer, []))

    def step(self, work: list[tuple[Sequence, int]]) -> list[torch.Tensor]:
        """Feed the next `n` tokens of each sequence in one batched step -> each one's logits [n, vocab].

        Rows are computed for prompt tokens and for the sequence's last token (what the runner
        computes); a chunk of generated tokens recomputed after preemption returns its last row only.
        """
        for seq, n in work:
            assert self.manager.can_grow(seq, seq.num_computed_tokens + n), "the test's cache is too small"
            self.manager.grow(seq, seq.num_computed_tokens + n)
        result = self.runner.execute(ScheduledBatch([s for s, _ in work], [n for _, n in work]))
        rows: dict[Sequence, list[torch.Tensor]] = {seq: [] for seq, _ in work}
        for seq, targets, logits in result.prompt_parts:
            rows[seq].append(logits)
            seq.prompt_logprobs.extend([None] * len(targets))
        for seq, logits in zip(result.sample_seqs, result.sample_logits, strict=True):
            rows[seq].append(logits[None])
        for seq, n in work:
            seq.num_computed_tokens += n
        return [torch.cat(rows[seq]) if rows[seq] else result.sample_logits[:0] for seq, _ in work]

    def free(self, seq: Sequence) -> None:
        self.manager.free(seq)
        seq.num_computed_tokens = 0

    def prefill(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """All prompts in one batched step, then freed -> each prompt's logits [L, vocab]."""
        seqs = [self.add(p) for p in prompts]
        logits = self.step([(s, len(p)) for s, p in zip(seqs, prompts, strict=True)])
        for seq in seqs:
            self.free(seq)
        return logits

    def feed(self, seq: Sequence, chunk: int) -> torch.Tensor:
        """Feed the rest of `seq` alone in chunks of `chunk` tokens -> the logits of the rows computed."""
        rows = []
        while seq.num_computed_tokens < seq.num_tokens:
            rows += self.step([(seq, min(chunk, seq.num_tokens - seq.num_computed_tokens))])
        return torch.cat(rows)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, chunk: int):
        """A miniature continuous-batching loop: prompt i joins at step i, prompts are fed in chunks
        of `chunk` tokens, and every step mixes prefill chunks with other sequences' decode tokens.
        Returns each prompt's generated tokens and the logits [max_new_tokens, vocab] that chose them."""
        seqs, logits = [], [[] for _ in prompts]
        for step in itertools.count():
            if step < len(prompts):
                seqs.append(self.add(prompts[step]))
            work = [
                (s, min(chunk, s.num_tokens - s.num_computed_tokens))
                for s in seqs
                if s.num_computed_tokens < s.num_tokens and len(s.token_ids) < max_new_tokens
            ]
            if not work:
                break
            for (seq, _), rows in zip(work, self.step(work), strict=True):
                if seq.num_computed_tokens == seq.num_tokens:  # its last token was fed: it samples
                    seq.token_ids.append(int(rows[-1].argmax()))
                    logits[seqs.index(seq)].append(rows[-1])
        for seq in seqs:
            self.free(seq)
        return [s.token_ids for s in seqs], [torch.stack(x) for x in logits]


@torch.inference_mode()
def hf_logits(hf, prompt: list[int]) -> torch.Tensor:
    return hf(torch.tensor([prompt])).logits[0].float()


@torch.inference_mode()
def hf_greedy_ignoring_eos(hf, prompt: list[int], max_new_tokens: int):
    """transformers' generate(do_sample=False) for exactly max_new_tokens tokens, eos included.

    A generation config with no eos at all: eos_token_id=None passed to generate() falls back to
    the model's own generation_config, and min_new_tokens would mask eos out of the logits.
    """
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    config.eos_token_id = None
    hf.generation_config.eos_token_id = None  # generate() merges the model's defaults back in
    try:
        out = hf.generate(
            torch.tensor([prompt]), generation_config=config, output_logits=True, return_dict_in_generate=True
        )
    finally:
        hf.generation_config.eos_token_id = hf.config.eos_token_id
    tokens = out.sequences[0, len(prompt) :].tolist()
    assert len(tokens) == max_new_tokens, "transformers stopped early"
    return tokens, torch.cat(out.logits).float()


@pytest.fixture(scope="module", params=["tiny", "second"])
def pair(request, tiny_checkpoint):
    """(Citadel's model, transformers' model, vocab size, engine steps) on the same checkpoint."""
    if request.param == "tiny":
        folder, hf, vocab = tiny_checkpoint, request.getfixturevalue("hf_model"), 640
    else:
        folder, hf, vocab = (
            request.getfixturevalue("second_v4_checkpoint"),
            request.getfixturevalue("second_v4_hf_model"),
            96,
        )
    model = v4(folder)
    return model, hf, vocab, Steps(model, load_tokenizer(tiny_checkpoint))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """(Citadel's model, engine steps) on the tiny checkpoint."""
    model = v4(tiny_checkpoint)
    return model, Steps(model, load_tokenizer(tiny_checkpoint))


def test_prompt_log_probs_match_transformers_for_prompts_below_and_above_window_and_rates(pair):
    model, hf, vocab, steps = pair
    prompts = random_prompts(PROMPT_LENGTHS + [8, 33], vocab, seed=11)
    for prompt, ours in zip(prompts, steps.prefill(prompts), strict=True):
        reference = hf_logits(hf, prompt)
        diff = (log_probs(ours) - log_probs(reference)).abs().max().item()
        assert diff <= 1e-3, f"prompt of {len(prompt)} tokens: log-probs differ by {diff}"


def test_a_batch_of_mixed_length_prompts_gives_what_each_prompt_gives_alone_and_frees_every_page(pair):
    model, _, vocab, steps = pair
    prompts = random_prompts(PROMPT_LENGTHS + [8, 33, 64], vocab, seed=12)
    free = steps.manager.num_free_pages
    batched = steps.prefill(prompts)
    for prompt, together in zip(prompts, batched, strict=True):
        alone = steps.prefill([prompt])[0]
        # Equal up to float32 rounding: the matmuls see other shapes when sequences are batched.
        assert torch.allclose(together, alone, atol=1e-4, rtol=0), f"prompt of {len(prompt)} tokens"
    assert steps.manager.num_free_pages == free


def test_chunked_prefill_among_other_decodes_then_greedy_decode_matches_transformers_generate(pair):
    model, hf, vocab, steps = pair
    prompts = random_prompts([3, 17, 45], vocab, seed=13)
    ours, our_logits = steps.greedy(prompts, max_new_tokens=24, chunk=7)
    for prompt, tokens, logits in zip(prompts, ours, our_logits, strict=True):
        reference, reference_logits = hf_greedy_ignoring_eos(hf, prompt, 24)
        assert tokens == reference, f"prompt of {len(prompt)} tokens"
        assert (log_probs(logits) - log_probs(reference_logits)).abs().max().item() <= 1e-3


def test_index_score_ties_are_broken_as_transformers_generate_breaks_them(tiny, hf_model):
    # The indexer's ReLU makes exact zero scores common with 4 index heads. torch.topk picks among
    # tied entries depending on the row's length, which in transformers is the prompt's entry count
    # for prompt tokens: so transformers' output at position 32 depends on whether the prompt has 60
    # or 33 tokens. The engine reproduces that from the prompt length, however it chunks the prompt.
    model, steps = tiny
    prompt = torch.randint(3, 640, (1, 60), generator=torch.Generator().manual_seed(1))[0].tolist()
    full, prefix = hf_logits(hf_model, prompt), hf_logits(hf_model, prompt[:33])
    assert (full[32] - prefix[32]).abs().max() > 1e-2, "precondition: this prompt has a tie at position 32"
    for chunk in (60, 7):
        seq = steps.add(prompt)
        ours = steps.feed(seq, chunk)
        steps.free(seq)
        assert (ours - full).abs().max() <= 1e-3, f"prefilled in chunks of {chunk}"
    assert (steps.prefill([prompt[:33]])[0] - prefix).abs().max() <= 1e-3


def test_bfloat16_runs_close_to_transformers_in_bfloat16(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    # bf16 rounding flips some discrete choices (indexer top-k, expert routing) in both
    # implementations, so elementwise maxima are meaningless: compare averages and the argmax.
    model = v4(tiny_checkpoint, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).eval()
    assert model.layers[1].attn.wq_a.weight.dtype == torch.bfloat16
    assert model.layers[1].attn.attn_sink.dtype == torch.float32  # kept in float32, as transformers does
    steps = Steps(model, load_tokenizer(tiny_checkpoint))
    assert steps.runner.cache.caches["window"][0].dtype == torch.bfloat16  # the cache is in the model's dtype
    prompts = random_prompts([5, 40, 100], 640, seed=14)
    for prompt, ours in zip(prompts, steps.prefill(prompts), strict=True):
        ours, reference = log_probs(ours), log_probs(hf_logits(hf, prompt))
        assert (ours - reference).abs().mean() < 0.1
        assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    tokens, _ = steps.greedy(prompts[:1], max_new_tokens=8, chunk=4)
    assert len(tokens[0]) == 8


def test_the_cache_spec_keeps_rings_per_sequence_and_compressed_entries_in_pages_at_their_rates(tiny):
    model, steps = tiny
    spec = model.cache_spec()
    assert [(g.name, g.layers, g.per_sequence, g.tokens_per_entry) for g in spec.groups] == [
        ("window", (0, 1, 2, 3), True, 1),
        ("csa_tail", (1, 3), True, 1),
        ("csa", (1, 3), False, 4),
        ("hca_tail", (2,), True, 1),
        ("hca", (2,), False, 8),
    ]
    # A slot: window 4 x 16 x 32, CSA tails 2 x 8 x (4*32 + 4*16), HCA tail 1 x 8 x 64 float32.
    assert spec.slot_bytes == 22528
    # Pages of 4 CSA entries (2 layers x (32 + 16) floats each): 16 tokens; or 12 HCA entries: 96 tokens.
    config = EngineConfig(max_num_seqs=2, block_size=4, kv_cache_memory=2 * 22528 + 10 * 1536)
    manager = ModelRunner(model, config, torch.device("cpu")).block_manager
    assert (spec.page_bytes(4), manager.num_free_pages) == (1536, 9)  # page 0 is the null page
    assert [spec.page_entries(g, 4) for g in spec.paged_groups] == [4, 12]
    seq, other, third = (steps.add([5]) for _ in range(3))
    assert manager.pages_for(40) == 3 + 1 and manager.pages_for(120) == 8 + 2
    manager.grow(seq, 40)
    assert [len(t) for t in seq.block_tables] == [3, 1] and seq.slot is not None
    assert not manager.can_grow(seq, 120)  # 6 more pages, 5 are free
    manager.grow(other, 1)
    assert manager.num_free_pages == 3 and not manager.can_grow(third, 1)  # pages are free, slots are not
    manager.free(seq)
    manager.free(other)
    assert manager.num_free_pages == 9 and manager.can_grow(third, 1)


def test_a_preempted_sequence_recomputed_from_its_tokens_continues_identically(tiny):
    model, steps = tiny
    prompt = random_prompts([30], 640, seed=15)[0]
    seq = steps.add(prompt)
    steps.feed(seq, chunk=30)
    for token in [5, 77, 301, 9]:
        seq.token_ids.append(token)
        expected = steps.feed(seq, chunk=1)[-1]
    steps.free(seq)  # preempted: its memory goes back; readmitted, it is prefilled again in chunks
    again = steps.feed(seq, chunk=10)[-1]
    assert (again - expected).abs().max() <= 1e-4
    steps.free(seq)


def test_a_v4_config_without_compressed_layers_is_refused_with_a_clear_error(tiny_checkpoint):
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    with pytest.raises(ValueError, match="only sliding-window layers"):
        V4CacheLayout.from_config(config)


def _copy_checkpoint(source: Path, target: Path, edit) -> Path:
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_loading_names_a_missing_unexpected_or_misshapen_tensor(tiny_checkpoint, tmp_path):
    name = "model.layers.1.attn.indexer.compressor.ape"
    missing = _copy_checkpoint(tiny_checkpoint, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*layers.1.attn.indexer.compressor.ape"):
        v4(missing)
    extra = _copy_checkpoint(tiny_checkpoint, tmp_path / "extra", lambda t: t.update(stray=torch.zeros(2)))
    with pytest.raises(CheckpointError, match="stray"):
        v4(extra)
    bad = _copy_checkpoint(tiny_checkpoint, tmp_path / "bad", lambda t: t.update({name: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"has shape \(3, 3\)"):
        v4(bad)
    scale = {"model.layers.0.attn.wq_a.scale": torch.ones(1)}  # a scale beside a weight that is not FP8
    fp8 = _copy_checkpoint(tiny_checkpoint, tmp_path / "fp8", lambda t: t.update(scale))
    with pytest.raises(CheckpointError, match="belong to no FP8 weight"):
        v4(fp8)
    mtp = _copy_checkpoint(tiny_checkpoint, tmp_path / "mtp", lambda t: t.update({"mtp.0.x": torch.zeros(1)}))
    v4(mtp)  # multi-token-prediction layers are not used and are skipped


def test_loading_a_truncated_shard_names_the_shard(tiny_checkpoint, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder / "config.json")
    data = (tiny_checkpoint / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        v4(folder)


@pytest.mark.parametrize("tokens", [1, 6])  # a batch-of-one decode (its Sinkhorn in Python floats); several rows
def test_hyper_connection_on_numpy_views_agrees_with_its_pytorch_arithmetic(tiny, tokens):
    model, _ = tiny
    """Without autograd on a CPU the hyper-connections run on NumPy (fewer dispatches); with it, in PyTorch."""
    block = model.layers[1]
    generator = torch.Generator().manual_seed(tokens)
    h = torch.randn(tokens, model.config.hc_mult, model.config.hidden_size, generator=generator)
    weights = (block.hc_attn_fn, block.hc_attn_base, block.hc_attn_scale)
    with torch.no_grad():
        fast = block.hc(h, *weights)
    with torch.enable_grad():
        reference = block.hc(h, *weights)
    for got, want in zip(fast, reference, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)


def test_four_stream_sinkhorn_gives_the_bits_of_the_general_one():
    """_sinkhorn_4x4 (V4's hc_mult 4, unrolled) against _sinkhorn_python, on matrices of several scales."""
    import numpy as np

    from inference.models.deepseek_v4_layers import _sinkhorn_4x4, _sinkhorn_python

    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 1e3):
        for _ in range(20):
            comb = (rng.random((1, 4, 4)) * scale + 1e-6).astype(np.float32)
            np.testing.assert_array_equal(_sinkhorn_4x4(comb, 8, 1e-6), _sinkhorn_python(comb, 8, 1e-6))
