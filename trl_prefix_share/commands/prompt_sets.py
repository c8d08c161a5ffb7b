"""The prompts of any prompt set a user trains GRPO / RLOO on, and their lengths as TRL tokenizes them.

A prompt set may hold plain-text prompts, conversational ones (lists of messages), or no prompt column at all: a
preference file whose prompt is implicit in `chosen` and `rejected` (HH-RLHF), from which TRL's `extract_prompt`
takes the common start. `bench --trainer grpo` and `estimate --trainer grpo` read all three the same way.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase
from trl.data_utils import is_conversational, maybe_extract_prompt


def prompt_of(row: dict[str, Any]) -> Any:
    """The row's prompt (a string or a list of messages), extracted from `chosen`/`rejected` when implicit; None for a
    row with neither."""
    if "prompt" not in row and not ("chosen" in row and "rejected" in row):
        return None
    prompt = maybe_extract_prompt(row).get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and is_conversational({"prompt": prompt})):
        return prompt
    return None


def prompt_token_ids(prompt: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """A prompt's tokens as TRL's GRPO/RLOO tokenize it: the chat template with the generation prompt, or plain text."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    return tokenizer(prompt)["input_ids"]


def prompt_only_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """`{"prompt": ...}` rows of every row that has a prompt (explicit or implicit), and how many rows had none."""
    prompts = [prompt_of(row) for row in rows]
    kept = [{"prompt": prompt} for prompt in prompts if prompt is not None]
    return kept, len(rows) - len(kept)
