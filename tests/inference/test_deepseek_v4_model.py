"""Citadel's DeepSeek-V4 against transformers' DeepseekV4ForCausalLM on the same weights.

transformers is the oracle: prompt log-probabilities must agree to 1e-3 in float32 and greedy
decoding must be token-identical, whether sequences run alone, batched, or prefilled in chunks
next to other sequences' decodes. transformers ignores the attention mask of left-padded
batches, so it always runs one unpadded sequence at a time here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference.models.deepseek_v4 import CheckpointError, load_model
from inference.models.deepseek_v4_batch import V4Batch
from inference.models.deepseek_v4_cache import CacheFullError, V4CachePool

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo-v4"
PROMPT_LENGTHS = [1, 3, 5, 17, 40, 100]  # around the window (16 / 6) and the rates (4, 8 / 2, 4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy sizes gain nothing from intra-op threads, and on a busy 2-core machine they cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(7, vocab, (n,), generator=generator).tolist() for n in lengths]


def new_pool(model, max_seqs: int = 16, page_entries: int = 4) -> V4CachePool:
    # Small pages, so that 100-token prompts span several pages of each group.
    return V4CachePool(
        model.config,
        byte_budget=1 << 24,
        max_seqs=max_seqs,
        dtype=model.dtype,
        device=model.device,
        page_entries=page_entries,
    )


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(dim=-1)


def feed(model, pool, cache, tokens: list[int], chunk: int) -> torch.Tensor:
    """Feed one sequence `tokens` in chunks -> logits [len(tokens), vocab]."""
    rows = []
    for start in range(0, len(tokens), chunk):
        new = tokens[start : start + chunk]
        rows.append(model.compute_logits(model(torch.tensor(new), V4Batch.build(pool, [(cache, len(new))]))))
    return torch.cat(rows)


@torch.inference_mode()
def hf_logits(hf, prompt: list[int]) -> torch.Tensor:
    return hf(torch.tensor([prompt])).logits[0].float()


def citadel_logits(model, pool, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All prompts prefilled in one batched step -> each prompt's logits [L, vocab]."""
    caches = [pool.allocate(len(p)) for p in prompts]
    batch = V4Batch.build(pool, [(c, len(p)) for c, p in zip(caches, prompts, strict=True)])
    logits = model.compute_logits(model(torch.tensor(sum(prompts, [])), batch))
    for cache in caches:
        pool.free(cache)
    return [logits[a:b] for a, b in zip(batch.offsets[:-1], batch.offsets[1:], strict=True)]


def greedy(model, pool, prompts, max_new_tokens: int, chunk: int):
    """A miniature continuous-batching loop: prompt i joins at step i, prompts are fed in chunks of
    `chunk` tokens, and every step mixes prefill chunks with other sequences' decode tokens.
    Returns each prompt's generated tokens and the logits [max_new_tokens, vocab] that chose them."""
    tokens = [[] for _ in prompts]
    logits = [[] for _ in prompts]
    running, fed, step = [], {}, 0
    while True:
        if step < len(prompts):
            running.append((step, pool.allocate(len(prompts[step]))))
        steps, ids, fed_now = [], [], []
        for i, cache in running:
            if fed.get(i, 0) < len(prompts[i]):
                new = prompts[i][fed.get(i, 0) : fed.get(i, 0) + chunk]
            elif len(tokens[i]) < max_new_tokens:
                new = tokens[i][-1:]
            else:
                continue
            steps.append((cache, len(new)))
            ids += new
            fed_now.append((i, len(new)))
        if not steps:
            break
        batch = V4Batch.build(pool, steps)
        last = model.compute_logits(model(torch.tensor(ids), batch)[[b - 1 for b in batch.offsets[1:]]])
        for (i, n), row in zip(fed_now, last, strict=True):
            fed[i] = fed.get(i, 0) + n
            if fed[i] >= len(prompts[i]):
                tokens[i].append(int(row.argmax()))
                logits[i].append(row)
        step += 1
    for _, cache in running:
        pool.free(cache)
    return [t[:max_new_tokens] for t in tokens], [torch.stack(x[:max_new_tokens]) for x in logits]


@torch.inference_mode()
def hf_greedy(hf, prompt: list[int], max_new_tokens: int):
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits).float()


def build_second_checkpoint(folder: Path) -> Path:
    """A different random V4: HCA first, rates 2 / 4, window 6, 2 streams, 3 of 5 experts routed
    by sigmoid scores, tied embeddings, plain RoPE on the compressed branches."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    config = DeepseekV4Config(
        vocab_size=96,
        hidden_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=5,
        num_attention_heads=2,
        head_dim=16,
        partial_rotary_factor=0.25,
        q_lora_rank=24,
        o_groups=1,
        o_lora_rank=8,
        n_routed_experts=5,
        num_experts_per_tok=3,
        scoring_func="sigmoid",
        layer_types=[
            "heavily_compressed_attention",
            "compressed_sparse_attention",
            "sliding_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
        ],
        mlp_layer_types=["hash_moe", "moe", "moe", "hash_moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        sliding_window=6,
        index_n_heads=2,
        index_head_dim=8,
        index_topk=3,
        hc_mult=2,
        hc_sinkhorn_iters=5,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DeepseekV4ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random values for what transformers initialises to constants
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("sinks", "position_bias", "base", "hc_base"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif leaf in ("scale", "hc_scale") or ("norm" in name and leaf == "weight"):
                param.copy_(1 + torch.randn(param.shape, generator=generator) * 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif name.endswith("tid2eid"):
                rows = [torch.randperm(5, generator=generator)[:3] for _ in range(buffer.shape[0])]
                buffer.copy_(torch.stack(rows))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory) -> Path:
    return build_second_checkpoint(tmp_path_factory.mktemp("v4-second"))


@pytest.fixture(scope="module", params=["tiny", "second"])
def pair(request, tiny_checkpoint, hf_model):
    """(Citadel's model, transformers' model, vocab size) on the same checkpoint."""
    from transformers import AutoModelForCausalLM

    if request.param == "tiny":
        return load_model(tiny_checkpoint), hf_model, 640
    folder = request.getfixturevalue("second_checkpoint")
    return load_model(folder), AutoModelForCausalLM.from_pretrained(folder).eval(), 96


@pytest.fixture(scope="module")
def citadel_tiny(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def test_prompt_log_probs_match_transformers_for_prompts_below_and_above_window_and_rates(pair):
    model, hf, vocab = pair
    prompts = random_prompts(PROMPT_LENGTHS + [8, 33], vocab, seed=11)
    batched = citadel_logits(model, new_pool(model), prompts)
    for prompt, ours in zip(prompts, batched, strict=True):
        reference = hf_logits(hf, prompt)
        diff = (log_probs(ours) - log_probs(reference)).abs().max().item()
        assert diff <= 1e-3, f"prompt of {len(prompt)} tokens: log-probs differ by {diff}"


def test_a_batch_of_mixed_length_prompts_gives_what_each_prompt_gives_alone(pair):
    model, _, vocab = pair
    prompts = random_prompts(PROMPT_LENGTHS + [8, 33, 64], vocab, seed=12)
    pool = new_pool(model)
    batched = citadel_logits(model, pool, prompts)
    for prompt, together in zip(prompts, batched, strict=True):
        alone = citadel_logits(model, pool, [prompt])[0]
        # Equal up to float32 rounding: the matmuls see other shapes when sequences are batched.
        assert torch.allclose(together, alone, atol=1e-4, rtol=0), f"prompt of {len(prompt)} tokens"
    assert pool.bytes_in_use == 0


def test_chunked_prefill_among_other_decodes_then_greedy_decode_matches_transformers_generate(pair):
    model, hf, vocab = pair
    prompts = random_prompts([3, 17, 45], vocab, seed=13)
    ours, our_logits = greedy(model, new_pool(model), prompts, max_new_tokens=24, chunk=7)
    for prompt, tokens, logits in zip(prompts, ours, our_logits, strict=True):
        reference, reference_logits = hf_greedy(hf, prompt, 24)
        assert tokens == reference, f"prompt of {len(prompt)} tokens"
        assert (log_probs(logits) - log_probs(reference_logits)).abs().max().item() <= 1e-3


def test_index_score_ties_are_broken_as_transformers_generate_breaks_them(citadel_tiny, hf_model):
    # The indexer's ReLU makes exact zero scores common with 4 index heads. torch.topk picks among
    # tied entries depending on the row's length, which in transformers is the prompt's entry count
    # for prompt tokens: so transformers' output at position 32 depends on whether the prompt has 60
    # or 33 tokens. The engine reproduces that from the prompt length, however it chunks the prompt.
    prompt = torch.randint(3, 640, (1, 60), generator=torch.Generator().manual_seed(1))[0].tolist()
    full, prefix = hf_logits(hf_model, prompt), hf_logits(hf_model, prompt[:33])
    assert (full[32] - prefix[32]).abs().max() > 1e-2, "precondition: this prompt has a tie at position 32"
    pool = new_pool(citadel_tiny)
    for chunk in (60, 7):
        cache = pool.allocate(prompt_len=60)
        ours = feed(citadel_tiny, pool, cache, prompt, chunk)
        pool.free(cache)
        assert (ours - full).abs().max() <= 1e-3, f"prefilled in chunks of {chunk}"
    assert (citadel_logits(citadel_tiny, pool, [prompt[:33]])[0] - prefix).abs().max() <= 1e-3


def test_bfloat16_runs_close_to_transformers_in_bfloat16(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    # bf16 rounding flips some discrete choices (indexer top-k, expert routing) in both
    # implementations, so elementwise maxima are meaningless: compare averages and the argmax.
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).eval()
    assert model.layers[1].attn.wq_a.weight.dtype == torch.bfloat16
    assert model.layers[1].attn.attn_sink.dtype == torch.float32  # kept in float32, as transformers does
    prompts = random_prompts([5, 40, 100], 640, seed=14)
    for prompt, ours in zip(prompts, citadel_logits(model, new_pool(model), prompts), strict=True):
        ours, reference = log_probs(ours), log_probs(hf_logits(hf, prompt))
        assert (ours - reference).abs().mean() < 0.1
        assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    tokens, _ = greedy(model, new_pool(model), prompts[:1], max_new_tokens=8, chunk=4)
    assert len(tokens[0]) == 8


def test_cache_pool_accounts_for_slots_and_pages_and_refuses_when_full(citadel_tiny):
    pool = V4CachePool(
        citadel_tiny.config, byte_budget=2 * 22528 + 6 * 1536, max_seqs=2, dtype=torch.float32, page_entries=4
    )
    assert (pool.slot_bytes, pool.page_bytes, pool.num_free_pages) == (22528, 1536, 5)
    assert pool.entries_per_page == {"csa": 4, "hca": 12}  # 16 and 96 tokens per page
    cache = pool.allocate(prompt_len=40)
    assert pool.pages_needed(cache, 40) == 3 + 1 and cache.nbytes == 22528
    pool.grow(cache, 40)
    assert cache.nbytes == 22528 + 4 * 1536 and pool.bytes_in_use == cache.nbytes
    assert pool.pages_needed(cache, 80) == 2 and not pool.can_grow(cache, 80)  # 20 CSA entries: 5 pages
    with pytest.raises(CacheFullError):
        pool.grow(cache, 80)
    assert pool.num_free_pages == 1  # a refused grow takes nothing
    other = pool.allocate(prompt_len=1)
    with pytest.raises(CacheFullError):
        pool.allocate(prompt_len=1)  # both slots are taken
    pool.free(cache)
    pool.free(other)
    assert pool.bytes_in_use == 0 and pool.num_free_pages == 5 and pool.num_free_slots == 2


def test_a_preempted_sequence_recomputed_from_its_tokens_continues_identically(citadel_tiny):
    model, pool = citadel_tiny, new_pool(citadel_tiny)
    prompt = random_prompts([30], 640, seed=15)[0]
    generated = [5, 77, 301, 9]
    cache = pool.allocate(len(prompt))
    feed(model, pool, cache, prompt, chunk=30)
    expected = feed(model, pool, cache, generated, chunk=1)[-1]
    pool.free(cache)  # preempted: its memory goes back; readmitted, it is prefilled again in chunks
    cache = pool.allocate(len(prompt))
    again = feed(model, pool, cache, prompt + generated, chunk=10)[-1]
    assert (again - expected).abs().max() <= 1e-4


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
        load_model(missing)
    extra = _copy_checkpoint(tiny_checkpoint, tmp_path / "extra", lambda t: t.update(stray=torch.zeros(2)))
    with pytest.raises(CheckpointError, match="stray"):
        load_model(extra)
    bad = _copy_checkpoint(tiny_checkpoint, tmp_path / "bad", lambda t: t.update({name: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"has shape \(3, 3\)"):
        load_model(bad)
    scale = {"model.layers.0.attn.wq_a.scale": torch.ones(1)}  # how FP8 checkpoints store block scales
    fp8 = _copy_checkpoint(tiny_checkpoint, tmp_path / "fp8", lambda t: t.update(scale))
    with pytest.raises(CheckpointError, match="quantized"):
        load_model(fp8)
    mtp = _copy_checkpoint(tiny_checkpoint, tmp_path / "mtp", lambda t: t.update({"mtp.0.x": torch.zeros(1)}))
    load_model(mtp)  # multi-token-prediction layers are not used and are skipped


def test_loading_a_truncated_shard_names_the_shard(tiny_checkpoint, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder / "config.json")
    data = (tiny_checkpoint / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load_model(folder)


def test_demo_v4_matches_transformers_when_the_demo_model_is_present():
    if not (DEMO / "config.json").is_file():
        pytest.skip(f"{DEMO} has no config.json yet (the demo model is trained separately)")
    from transformers import AutoModelForCausalLM

    if json.loads((DEMO / "config.json").read_text()).get("model_type") != "deepseek_v4":
        pytest.skip(f"{DEMO} is not a DeepSeek-V4 checkpoint")
    model = load_model(DEMO)
    hf = AutoModelForCausalLM.from_pretrained(DEMO).eval()
    prompts = random_prompts([2, 20, 90], model.config.vocab_size, seed=16)
    for prompt, ours in zip(prompts, citadel_logits(model, new_pool(model), prompts), strict=True):
        assert (log_probs(ours) - log_probs(hf_logits(hf, prompt))).abs().max() <= 1e-3
    tokens, _ = greedy(model, new_pool(model), prompts[1:], max_new_tokens=12, chunk=7)
    assert tokens[0] == hf_greedy(hf, prompts[1], 12)[0]
