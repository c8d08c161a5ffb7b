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
#: Sets derived from the sample files: a common system message in front of every (conversational) prompt.
DERIVED_SETS = ("ultrafeedback_system", "ultrafeedback_tools")
#: Characters of the derived system prompt (about 1k tokens with the SmolLM tokenizer).
SYSTEM_PROMPT_CHARS = 4500


def system_prompt() -> str:
    """A long system prompt built from real text: a role line, then pandalm's instructions (the first rows, in file
    order) as house rules, cut to ``SYSTEM_PROMPT_CHARS`` characters. Deterministic."""
    lines = ["You are a careful assistant. Follow these house rules and examples of good practice:"]
    with open(SHARED / "data" / SHORT_NAMES["pandalm"], encoding="utf-8") as handle:
        for line in handle:
            lines.append("- " + " ".join(json.loads(line)["prompt"].split()))
            if sum(len(text) for text in lines) > SYSTEM_PROMPT_CHARS:
                break
    return "\n".join(lines)[:SYSTEM_PROMPT_CHARS]


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather in a city.

    Args:
        city: The city name, e.g. "Paris".
        unit: The temperature unit, "celsius" or "fahrenheit".
    """
    return f"sunny in {city}"


def search_web(query: str, max_results: int = 5) -> list:
    """Search the web and return the top results.

    Args:
        query: What to search for.
        max_results: How many results to return.
    """
    return []


def run_python(code: str) -> str:
    """Run a short Python snippet in a sandbox and return what it prints.

    Args:
        code: The Python source to run.
    """
    return ""


def convert_currency(amount: float, source: str, target: str) -> float:
    """Convert an amount of money between currencies at today's rate.

    Args:
        amount: The amount to convert.
        source: The ISO code of the currency to convert from, e.g. "EUR".
        target: The ISO code of the currency to convert to, e.g. "USD".
    """
    return amount


TOOLS = (get_weather, search_web, run_python, convert_currency)


def tools_system_prompt() -> str:
    """A tool-calling system prompt: the JSON schemas transformers derives from the tools' signatures and docstrings
    (what a tool-aware chat template renders for ``tools=[...]``, as in TRL's tool-calling examples), in text, so any
    tokenizer's template carries it."""
    from transformers.utils import get_json_schema

    schemas = json.dumps([get_json_schema(tool) for tool in TOOLS], indent=2)
    return (
        "You are a helpful assistant with access to the following functions. To call one, answer with a JSON object "
        '{"name": ..., "arguments": {...}}.\n\n' + schemas
    )


def _derived_rows(name: str) -> list[dict[str, Any]]:
    """UltraFeedback with a system message in front of every prompt: preference rows (``_system``) or prompts with
    tool schemas (``_tools``), conversational."""
    rows = load_rows("ultrafeedback")
    system = system_prompt() if name == "ultrafeedback_system" else tools_system_prompt()
    derived = []
    for row in rows:
        prompt = [{"role": "system", "content": system}, {"role": "user", "content": row["prompt"]}]
        entry = {"prompt": prompt}
        if name == "ultrafeedback_system":
            entry["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
            entry["rejected"] = [{"role": "assistant", "content": row["rejected"]}]
        derived.append(entry)
    return derived


def dataset_label(name: str) -> str:
    """A short label for tables: the short name, or the file stem."""
    return name if name in SHORT_NAMES or name in DERIVED_SETS else Path(name).stem.split("/")[-1]


def load_rows(name: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a preference dataset given by short name (or a derived set), local JSON/JSONL/Parquet file, or hub
    name."""
    if name in DERIVED_SETS:
        return _derived_rows(name)
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
