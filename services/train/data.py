"""Question datasets: loading and the deterministic order a run reads them in.

Loads jsonl files, parquet files and Hugging Face dataset directories (saved
with ``save_to_disk``) into ``Question`` rows, with configurable prompt and
answer fields. ``DataCursor`` hands out batches in a seeded shuffle, one
permutation per epoch, and its position is part of every checkpoint so that a
resumed run reads exactly the questions the uninterrupted run would have.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from reward.protocol import CALL_KEYWORDS


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Question:
    prompt: str | list[dict[str, str]]
    """Text, or chat messages when the chat template is on."""
    reference: str
    index: int
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """The dataset columns named by ``data.metadata_fields``, sent to the verifiers."""


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl or .parquet file, or of a saved Hugging Face dataset directory."""
    source = Path(path)
    if not source.exists():
        raise DataError(f"dataset {source} does not exist; check data.train / data.eval")
    if source.is_dir():
        return _load_hf_directory(source)
    if source.suffix == ".jsonl":
        return _load_jsonl(source)
    if source.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(source).to_pylist()
    raise DataError(
        f"dataset {source}: unsupported format {source.suffix!r}; use .jsonl, .parquet "
        "or a directory written by datasets.Dataset.save_to_disk"
    )


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return rows


def _load_hf_directory(path: Path) -> list[dict[str, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"dataset {path} has splits {list(loaded)}; point at one split")
        loaded = loaded["train"]
    return loaded.to_list()


def load_questions(
    path: str | Path,
    *,
    prompt_field: str,
    answer_field: str,
    chat_template: bool = False,
    system_prompt: str | None = None,
    metadata_fields: Sequence[str] | Literal["all"] = (),
    limit: int | None = None,
) -> list[Question]:
    """Questions of a dataset, checking that every row has the configured fields."""
    rows = load_rows(path)
    if not rows:
        raise DataError(f"dataset {path} is empty")
    for name, setting in ((prompt_field, "prompt_field"), (answer_field, "answer_field")):
        if name not in rows[0]:
            raise DataError(
                f"dataset {path} has no field {name!r} (data.{setting}); "
                f"its fields are {sorted(rows[0])}"
            )
    chosen = rows[:limit] if limit else rows
    columns = _metadata_columns(path, rows[0], metadata_fields, prompt_field)
    return [
        Question(
            _prompt(str(row[prompt_field]), chat_template, system_prompt),
            str(row[answer_field]),
            index,
            _metadata(path, index, row, columns),
        )
        for index, row in enumerate(chosen)
    ]


def _metadata_columns(
    path: str | Path,
    first: Mapping[str, Any],
    wanted: Sequence[str] | Literal["all"],
    prompt_field: str,
) -> list[str]:
    """The columns sent as metadata: the named ones, or with ``"all"`` every column but
    the prompt (as TRL passes every dataset column to a reward function)."""
    columns = [n for n in first if n != prompt_field] if wanted == "all" else list(wanted)
    missing = [name for name in columns if name not in first]
    if missing:
        raise DataError(
            f"dataset {path} has no column(s) {missing} (data.metadata_fields); "
            f"its columns are {sorted(first)}"
        )
    reserved = sorted(set(columns) & CALL_KEYWORDS)
    if reserved:
        raise DataError(
            f"dataset {path}: column(s) {reserved} of data.metadata_fields would collide "
            "with the keywords a reward function is called with; rename them in the dataset"
        )
    return columns


def _metadata(
    path: str | Path, index: int, row: Mapping[str, Any], columns: Sequence[str]
) -> dict[str, Any]:
    values = {name: row.get(name) for name in columns}
    try:
        json.dumps(values, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise DataError(
            f"dataset {path} row {index}: a data.metadata_fields column is not JSON "
            f"({error}); name only columns of strings, numbers, lists or mappings"
        ) from None
    return values


def _prompt(text: str, chat: bool, system_prompt: str | None) -> str | list[dict[str, str]]:
    if not chat:
        return text
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": text}]


class DataCursor:
    """Seeded, epoch-wise shuffled batches of questions, taken for a step; resumable from
    ``resume_state(step)``."""

    def __init__(self, questions: list[Question], seed: int) -> None:
        if not questions:
            raise DataError("no training questions")
        self.questions = questions
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)
        self._state_before: dict[int, dict[str, int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.questions)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, size: int, step: int) -> list[Question]:
        """``size`` questions for ``step``."""
        self._state_before.setdefault(step, self.state())
        batch = []
        while len(batch) < size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            batch.append(self.questions[self._order[self.position]])
            self.position += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def resume_state(self, step: int) -> dict[str, int]:
        """The state a run resumes from after ``step``: the cursor before the questions
        taken for later steps (async mode takes the next step's while this one trains),
        so a resumed run takes them again. Forgets what steps up to ``step`` took."""
        for done in [s for s in self._state_before if s <= step]:
            del self._state_before[done]
        return self._state_before[min(self._state_before)] if self._state_before else self.state()

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
