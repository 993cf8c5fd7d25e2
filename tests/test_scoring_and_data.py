"""The training glue without Ray or vLLM: rewards to advantages, offsets to tokens, data.

Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from reward.protocol import Result, StepReward
from rollout import RolloutRecord
from services.embedded.tiny_model import build_tokenizer
from services.train.batch import StepBatch, token_indices_of_offsets
from services.train.data import DataCursor, DataError, Question, load_questions
from services.train.sampling import group_seed


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def record(tokenizer, text: str, index: int = 0) -> RolloutRecord:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return RolloutRecord("g", index, [1, 2], ids, [-0.1] * len(ids), text, "stop", 0)


def ok(reward, steps=None) -> Result:
    return Result(id="x", status="ok", reward=reward, step_rewards=steps)


QUESTION = Question("Q", "1", 0)


def test_non_ok_results_become_nan_and_are_left_out_of_training(tokenizer):
    results = [ok(1.0), ok(0.0), Result(id="x", status="error", reward=None, error="boom")]
    group = [record(tokenizer, t, i) for i, t in enumerate(["a", "b", "c"])]
    batch = StepBatch.scored([QUESTION], [group], results)
    rewards = batch.rewards
    assert rewards[0, :2].tolist() == [1.0, 0.0] and math.isnan(rewards[0, 2])
    samples = batch.with_advantages("outcome", scale="group", tokenizer=tokenizer).train_samples()
    # valid rewards [1, 0]: mean 0.5, std (Bessel) = sqrt(0.5) → ±0.5/0.70711 = ±0.70711
    assert [round(s.advantages, 4) for s in samples] == [0.7071, -0.7071]


def test_dynamic_sampling_keeps_only_groups_with_a_learning_signal():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [math.nan, 1.0]])
    questions = [Question("Q", "1", i) for i in range(3)]
    batch = StepBatch(questions, [[], [], []], [[], [], []], rewards)
    kept = batch.informative()
    # flat [1, 1] and under-filled [NaN, 1] carry no signal; [0, 1] does
    assert [q.index for q in kept.questions] == [1] and kept.rewards.tolist() == [[0.0, 1.0]]
    assert batch.metrics()["reward/zero_variance_groups_frac"] == pytest.approx(2 / 3)


def test_character_offsets_map_to_the_token_that_completes_them(tokenizer):
    text = "1+2=3\n3+4=7\n\\boxed{7}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # byte-level tokenizer: one token per character, so the end offset e maps to token e-1
    assert token_indices_of_offsets(tokenizer, ids, [5, 11, len(text)]) == [4, 10, len(text) - 1]


def test_process_samples_give_each_token_the_sum_of_later_steps(tokenizer):
    texts = ["1+1=2\n\\boxed{2}", "1+1=3\n\\boxed{3}"]
    group = [record(tokenizer, t, i) for i, t in enumerate(texts)]
    results = [
        ok(1.0, [StepReward(end=5, reward=1.0), StepReward(end=len(texts[0]), reward=1.0)]),
        ok(0.0, [StepReward(end=5, reward=0.0), StepReward(end=len(texts[1]), reward=0.0)]),
    ]
    batch = StepBatch.scored([QUESTION], [group], results)
    samples = batch.with_advantages("process", scale="group", tokenizer=tokenizer).train_samples()
    # all step rewards R = [1, 1, 0, 0]: mean 0.5, std = sqrt(1/3) → r̃ = ±0.5·sqrt(3) = ±0.8660
    # (eps = 1e-6 moves them by about 2e-6)
    first, second = samples[0].advantages, samples[1].advantages
    assert first[0] == pytest.approx(2 * 0.8660254, abs=1e-5)  # before both step ends
    assert first[5] == pytest.approx(0.8660254, abs=1e-5)  # only the final step remains
    assert second[0] == pytest.approx(-2 * 0.8660254, abs=1e-5)


def test_group_seeds_are_stable_and_distinct():
    assert group_seed(0, 1, 2) == group_seed(0, 1, 2)
    seeds = {group_seed(0, step, i) for step in range(20) for i in range(16)}
    assert len(seeds) == 320


def test_jsonl_parquet_and_hf_directories_load_the_same_questions(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": f"Compute {i}+1.", "a": str(i + 1)} for i in range(5)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    hf_dir = tmp_path / "hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(hf_dir))
    loaded = [
        [(q.prompt, q.reference) for q in load_questions(p, prompt_field="q", answer_field="a")]
        for p in (jsonl, parquet, hf_dir)
    ]
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0][2] == ("Compute 2+1.", "3")


def test_chat_prompts_become_messages(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "hi", "answer": "1"}) + "\n")
    (question,) = load_questions(
        path,
        prompt_field="question",
        answer_field="answer",
        chat_template=True,
        system_prompt="Be brief.",
    )
    assert question.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]


def test_bad_data_names_the_problem(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "x", "answer": "1"}\n{not json\n')
    with pytest.raises(DataError, match="broken.jsonl:2"):
        load_questions(broken, prompt_field="question", answer_field="answer")
    csv = tmp_path / "d.csv"
    csv.write_text("question,answer\nx,1\n")
    with pytest.raises(DataError, match="unsupported format"):
        load_questions(csv, prompt_field="question", answer_field="answer")
    with pytest.raises(DataError, match="does not exist"):
        load_questions(tmp_path / "missing.jsonl", prompt_field="q", answer_field="a")


def test_cursor_is_seeded_per_epoch_and_resumes_exactly():
    questions = load_like(10)
    straight = DataCursor(questions, seed=3)
    expected = [q.index for step in (1, 2, 3, 4) for q in straight.next_batch(4, step)]
    first = DataCursor(questions, seed=3)
    got = [q.index for step in (1, 2) for q in first.next_batch(4, step)]
    first.next_batch(4, 3)  # async look-ahead: taken while step 2 trains, then stopped
    resumed = DataCursor(questions, seed=3)
    resumed.restore(first.resume_state(2))
    got += [q.index for step in (3, 4) for q in resumed.next_batch(4, step)]
    assert got == expected
    assert sorted(expected[:10]) == list(range(10))  # an epoch is a permutation


def load_like(n: int):
    from services.train.data import Question

    return [Question(f"q{i}", str(i), i) for i in range(n)]
