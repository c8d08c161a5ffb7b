"""Benchmark data: the shared sample files by short name, any local file, or a hub dataset."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase
from trl.data_utils import is_conversational, maybe_extract_prompt

#: Where the repository's sample data and tokenizer live (`../shared` next to the checkout, or this variable).
SHARED = Path(os.environ.get("TRL_PREFIX_SHARE_SHARED", Path(__file__).resolve().parents[4] / "shared"))
SHORT_NAMES = {
    "hh_harmless": "hh_harmless_base_test.jsonl",
    "hh_helpful": "hh_helpful_base_test.jsonl",
    "ultrafeedback": "ultrafeedback_binarized_1200.jsonl",
    "pandalm": "pandalm_human_testset.jsonl",
}
DEFAULT_TOKENIZER = SHARED / "tokenizers" / "smollm"


def dataset_label(name: str) -> str:
    """A short label for tables: the short name, or the file stem."""
    return name if name in SHORT_NAMES else Path(name).stem.split("/")[-1]


def load_rows(name: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a preference dataset given by short name, local JSON/JSONL/Parquet file, or hub name."""
    if name in SHORT_NAMES:
        path = SHARED / "data" / SHORT_NAMES[name]
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: set TRL_PREFIX_SHARE_SHARED to the folder holding data/")
        name = str(path)
    path = Path(name)
    if path.suffix == ".jsonl" and path.exists():  # the common case, read directly (no datasets cache)
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    from trl_prefix_share.commands.estimate import load_preference_dataset

    return load_preference_dataset(name, split=split).to_list()


def _prompt_tokens(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> int:
    prompt = row["prompt"]
    if is_conversational(row):
        return len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def trainable_rows(
    rows: list[dict[str, Any]], kind: str, tokenizer: PreTrainedTokenizerBase, max_length: int | None
) -> list[dict[str, Any]]:
    """Explicit-prompt rows every trainer can train on.

    ORPO and CPO truncate the response, never the prompt: a prompt that fills ``max_length`` gives stock a NaN loss
    and is refused by ours, so such rows are left out for those two kinds (a handful on the shared data)."""
    rows = [maybe_extract_prompt(row) for row in rows]
    if kind in {"orpo", "cpo", "simpo"} and max_length is not None:
        rows = [row for row in rows if _prompt_tokens(row, tokenizer) + 4 < max_length]
    return rows


def sample_rows(rows: list[dict[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """A seeded random sample of ``count`` rows, so the timed batches represent the whole file."""
    return random.Random(seed).sample(rows, min(count, len(rows)))
