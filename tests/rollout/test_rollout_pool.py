"""The real stack: a pool of two vLLM engines (CPU build) in Ray actors, tiny model.

One pool serves every test in this module (see conftest.py); tests run in file
order and the weight-update tests build on each other: version 0 (the model
directory), then version 1 (perturbed weights), refused updates, and finally
engines killed or frozen mid-batch, whose replacements must come back on version 1.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from rollout import GroupRequest, SamplingSpec, WeightUpdateError, serialize_weights

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

TEXT_PROMPTS = ["Q: 2+3\nA:", "Q: 14-5\nA:", "Q: 7+8-1\nA:", "Hello"]
CHAT = [{"role": "user", "content": "What is 2+2?"}]


def _requests(seed: int = 100) -> list[GroupRequest]:
    reqs = [GroupRequest(f"text-{i}", p, seed=seed + 10 * i) for i, p in enumerate(TEXT_PROMPTS)]
    return [*reqs, GroupRequest("chat-0", CHAT, seed=seed + 99)]


@pytest.fixture(scope="module")
def hf_model(rollout_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(rollout_tiny_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(rollout_tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(rollout_tiny_model_dir)


@pytest.fixture(scope="module")
def perturbed(hf_model):
    """A copy of the model with noisy weights (version 1) and its safetensors payload."""
    import copy

    model = copy.deepcopy(hf_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.5 * param.std())
    return model, serialize_weights(model.state_dict())


def reference_logprobs(model, record, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """transformers' log-probabilities of a record's tokens under what vLLM sampled from."""
    ids = torch.tensor([record.prompt_token_ids + record.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(record.prompt_token_ids) - 1 : -1].float()
    if temperature > 0:
        logits = logits / temperature
    if top_p < 1:
        logits = _nucleus(logits, top_p)
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(1, torch.tensor(record.token_ids)[:, None])[:, 0]


def _nucleus(logits: torch.Tensor, p: float) -> torch.Tensor:
    # vLLM's rule: sort ascending, drop tokens whose cumulative mass is <= 1 - p, keep the top one.
    sorted_logits, index = logits.sort(dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - p
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, index, sorted_logits)


def assert_logprobs_match(model, groups, temperature, top_p=1.0, tol=1e-4):
    diffs = [
        (reference_logprobs(model, r, temperature, top_p) - torch.tensor(r.inference_logprobs))
        .abs()
        .flatten()
        for group in groups
        for r in group
    ]
    diff = torch.cat(diffs)
    assert diff.numel() > 0
    assert diff.mean().item() < tol, f"mean |diff| {diff.mean().item():.2e}"
    assert diff.max().item() < 10 * tol, f"max |diff| {diff.max().item():.2e}"


# ------------------------------------------------------------------------ sampling


def test_groups_of_g_for_text_and_chat_prompts(rollout_pool, tokenizer):
    sampling = SamplingSpec(n=4, max_tokens=12, temperature=1.0)
    requests = _requests()
    groups = rollout_pool.generate(requests, sampling)
    assert [g[0].group_id for g in groups] == [r.group_id for r in requests]
    for request, group in zip(requests, groups, strict=True):
        assert [r.sample_index for r in group] == [0, 1, 2, 3]
        for record in group:
            assert record.group_id == request.group_id
            assert record.weights_version == 0
            assert 1 <= len(record.token_ids) <= 12
            assert len(record.inference_logprobs) == len(record.token_ids)
            assert all(lp <= 0 for lp in record.inference_logprobs)
            assert record.finish_reason in {"stop", "length"}
            if record.finish_reason == "length":
                assert len(record.token_ids) == 12
    chat_ids = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert groups[-1][0].prompt_token_ids == tokenizer.encode(chat_ids, add_special_tokens=False)
    assert groups[0][0].prompt_token_ids == tokenizer.encode(TEXT_PROMPTS[0])
    # a group's completions differ (seed + i per completion), and seeds reproduce them
    assert len({tuple(r.token_ids) for r in groups[0]}) > 1
    again = rollout_pool.generate(requests[::-1], sampling)[::-1]
    assert [[r.token_ids for r in g] for g in again] == [[r.token_ids for r in g] for g in groups]


def test_stop_strings_end_the_text(rollout_pool, tokenizer):
    free = SamplingSpec(n=2, max_tokens=16, temperature=1.0, ignore_eos=True)
    request = [GroupRequest("stop", "Q: 1+1\nA:", seed=7)]
    [group] = rollout_pool.generate(request, free)
    text = group[0].text
    stop = next((c for c in text[2:] if c.isascii() and c.isalnum()), None)
    assert stop is not None, f"no usable stop character in {text!r}"
    cut = text.index(stop)
    [stopped] = rollout_pool.generate(request, SamplingSpec(n=2, max_tokens=16, stop=(stop,)))
    assert stopped[0].text == text[:cut]
    assert stopped[0].finish_reason == "stop"
    assert len(stopped[0].token_ids) <= len(group[0].token_ids)
    assert stopped[0].token_ids == group[0].token_ids[: len(stopped[0].token_ids)]
    # the text leaves the stop string out; the tokens that produced it stay in
    assert stop in tokenizer.decode(stopped[0].token_ids)
    assert all(len(r.token_ids) == 16 for r in group)  # ignore_eos: exactly max_tokens


def test_big_seeded_batch_keeps_the_engines_alive(rollout_pool):
    # 512 seeded sequences with ~40-token prompts: far more prefill than one step's
    # token budget. With vLLM's chunked prefill this killed CPU engines (a seeded
    # generator cannot be rewound); the engine disables it on CPU.
    requests = [
        GroupRequest(
            f"big-{i}", f"Q: {i}+{7 * i} and some more words to make it longer\nA:", seed=i
        )
        for i in range(64)
    ]
    restarts = rollout_pool.restarts
    groups = rollout_pool.generate(requests, SamplingSpec(n=8, max_tokens=8, ignore_eos=True))
    assert sum(len(r.token_ids) for g in groups for r in g) == 64 * 8 * 8
    assert rollout_pool.restarts == restarts


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers(rollout_pool, hf_model, temperature):
    groups = rollout_pool.generate(
        _requests(), SamplingSpec(n=4, max_tokens=12, temperature=temperature)
    )
    assert_logprobs_match(hf_model, groups, temperature)


def test_greedy_reports_unscaled_logprobs(rollout_pool, hf_model):
    groups = rollout_pool.generate(_requests(), SamplingSpec.greedy(12))
    assert all(len(g) == 1 for g in groups)
    assert_logprobs_match(hf_model, groups, temperature=0.0)
    with torch.no_grad():
        record = groups[0][0]
        ids = torch.tensor([record.prompt_token_ids + record.token_ids])
        logits = hf_model(ids).logits[0, len(record.prompt_token_ids) - 1 : -1]
    assert logits.argmax(-1).tolist() == record.token_ids


def test_top_p_logprobs_are_renormalised_over_the_nucleus(rollout_pool, hf_model):
    groups = rollout_pool.generate(
        _requests(), SamplingSpec(n=4, max_tokens=12, temperature=0.8, top_p=0.7)
    )
    assert_logprobs_match(hf_model, groups, temperature=0.8, top_p=0.7)
    full = [r for g in groups for r in g]
    plain = torch.cat([reference_logprobs(hf_model, r, 0.8) for r in full])
    ours = torch.tensor([lp for r in full for lp in r.inference_logprobs])
    assert (ours >= plain - 1e-5).all() and (ours > plain + 1e-3).any()


def test_submit_and_collect_overlap_and_keep_order(rollout_pool):
    sampling = SamplingSpec(n=3, max_tokens=8)
    first = rollout_pool.submit(_requests(1), sampling)
    second = rollout_pool.submit(_requests(2), sampling)
    b = rollout_pool.collect(second)
    a = rollout_pool.collect(first)
    assert (
        [g[0].group_id for g in a]
        == [g[0].group_id for g in b]
        == [r.group_id for r in _requests()]
    )
    assert a == rollout_pool.generate(_requests(1), sampling)
    with pytest.raises(RuntimeError, match="already collected"):
        rollout_pool.collect(first)


# ------------------------------------------------------------------------- weights


SEEDED = [GroupRequest("seeded-a", "Q: 3+4\nA:", seed=5), GroupRequest("seeded-b", "Hi", seed=6)]
SEEDED_SAMPLING = SamplingSpec(n=4, max_tokens=16, temperature=1.0, ignore_eos=True)


def _tokens(groups):
    return [[r.token_ids for r in g] for g in groups]


def test_weight_update_changes_outputs_on_every_engine(rollout_pool, perturbed):
    model, payload = perturbed
    before = rollout_pool.generate(SEEDED, SEEDED_SAMPLING)
    assert rollout_pool.weights_versions() == [0, 0]
    rollout_pool.update_weights(payload, version=1)
    assert rollout_pool.weights_versions() == [1, 1]
    assert rollout_pool.weights_version == 1
    after = rollout_pool.generate(SEEDED, SEEDED_SAMPLING)
    assert _tokens(after) != _tokens(before)
    assert {r.weights_version for g in after for r in g} == {1}
    assert_logprobs_match(model, after, temperature=1.0)
    groups = rollout_pool.generate(_requests(), SamplingSpec(n=4, max_tokens=12, temperature=0.7))
    assert_logprobs_match(model, groups, temperature=0.7)


@pytest.mark.parametrize(
    ("fault", "message"),
    [("unknown name", "does not have"), ("wrong shape", "wrong shape"), ("missing", "incomplete")],
)
def test_malformed_update_is_refused_and_nothing_changes(rollout_pool, perturbed, fault, message):
    model, _ = perturbed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if fault == "unknown name":
        state["model.layers.99.mlp.up_proj.weight"] = torch.zeros(3, 3)
    elif fault == "wrong shape":
        state["model.norm.weight"] = torch.zeros(65)
    else:
        del state["model.layers.0.self_attn.q_proj.weight"]
    before = rollout_pool.generate(SEEDED, SEEDED_SAMPLING)
    with pytest.raises(WeightUpdateError, match=message):
        rollout_pool.update_weights(serialize_weights(state), version=2)
    assert rollout_pool.weights_versions() == [1, 1]
    assert _tokens(rollout_pool.generate(SEEDED, SEEDED_SAMPLING)) == _tokens(before)


def test_engines_refuse_a_malformed_update_sent_by_reference(rollout_pool, rollout_ray):
    # An ObjectRef skips the pool's own check: each engine validates before loading.
    bad = rollout_ray.put(serialize_weights({"model.bogus.weight": torch.zeros(2)}))
    before = rollout_pool.generate(SEEDED, SEEDED_SAMPLING)
    with pytest.raises(WeightUpdateError, match=r"model\.bogus\.weight"):
        rollout_pool.update_weights(bad, version=3)
    assert rollout_pool.weights_versions() == [1, 1]
    assert rollout_pool.weights_version == 1
    assert _tokens(rollout_pool.generate(SEEDED, SEEDED_SAMPLING)) == _tokens(before)


# ------------------------------------------------------------------------- health


def test_dead_and_hung_engines_are_replaced_and_their_groups_reissued(
    rollout_pool, rollout_process_alive, monkeypatch
):
    """Engine 1's actor is SIGKILLed (dead) and engine 0's processes (its actor, which
    runs vLLM's engine core, and any vLLM child) are SIGSTOPped (hung) while a batch
    is in flight: the batch completes with every
    group exactly once, both engines are replaced, the replacements serve version 1
    and none of the old engines' processes survive."""
    monkeypatch.setattr(
        rollout_pool, "config", rollout_pool.config.model_copy(update={"call_timeout_s": 12})
    )
    hung, dead = rollout_pool.process_infos()
    reference = rollout_pool.generate(SEEDED, SEEDED_SAMPLING)
    requests = [GroupRequest(f"kill-{i}", f"Q: {i}+{i}\nA:", seed=i) for i in range(16)]
    sampling = SamplingSpec(n=8, max_tokens=48, ignore_eos=True)
    restarts = rollout_pool.restarts

    handle = rollout_pool.submit(requests, sampling)
    for pid, _ in [(hung["pid"], None), *hung["children"]]:
        os.kill(pid, signal.SIGSTOP)
    os.kill(dead["pid"], signal.SIGKILL)
    groups = rollout_pool.collect(handle)

    assert [g[0].group_id for g in groups] == [r.group_id for r in requests]
    assert all([r.sample_index for r in g] == list(range(8)) for g in groups)
    assert len({(r.group_id, r.sample_index) for g in groups for r in g}) == 16 * 8
    assert {r.weights_version for g in groups for r in g} == {1}
    assert rollout_pool.restarts == restarts + 2
    # the replacements came up on the current weights before serving
    assert rollout_pool.weights_versions() == [1, 1]
    new_pids = {info["pid"] for info in rollout_pool.process_infos()}
    assert not new_pids & {hung["pid"], dead["pid"]}
    old = [(info["pid"], info["create_time"]) for info in (hung, dead)]
    old += [child for info in (hung, dead) for child in info["children"]]
    leftovers = [pid for pid, created in old if rollout_process_alive(pid, created)]
    assert not leftovers, f"processes of the replaced engines still running: {leftovers}"
    # both new engines give the version-1 outputs for seeded requests
    assert _tokens(rollout_pool.generate(SEEDED, SEEDED_SAMPLING)) == _tokens(reference)
