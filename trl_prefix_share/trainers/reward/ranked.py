"""Ranked-list reward data: one prompt, K responses ordered best to worst, trained on all ordered pairs at once.

Format (one example per prompt; standard text or conversational messages, like TRL's preference formats)::

    {"prompt": "What is 2 + 2?",
     "responses": ["2 + 2 = 4.", "It is 4, I think.", "5"],    # best first
     "ranks": [1, 2, 2]}                                       # optional: lower is better, equal ranks are ties

    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
     "responses": [[{"role": "assistant", "content": "4."}], [{"role": "assistant", "content": "5"}]]}

Without ``"prompt"`` the responses are full texts (implicit prompt); their common token prefix is shared all the same.
A tokenized dataset may give ``response_ids`` (full sequences) and optionally ``response_ranks`` instead.

Every pair ``(i, j)`` with response ``i`` ranked strictly better than ``j`` is a Bradley-Terry pair: ``K (K - 1) / 2``
pairs without ties, all computed from one document in which the prompt is run once and each response once. The loss
of a batch is the mean over all its pairs of ``-log sigmoid(r_i - r_j)``, which is exactly what stock
``RewardTrainer`` computes on the binarized pairs (``binarize_ranked``) fed as one batch: the collator presents the
model's scores to TRL's loss code in that binarized layout, so the loss, ``center_rewards_coefficient`` and every
metric (including ``num_tokens``) are stock TRL's for those pairs. A batch of ``per_device_train_batch_size`` prompts
holds a variable number of pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import _tokenize, get_dataset_column_names
from trl.trainer.reward_trainer import DataCollatorForPreference
from trl.trainer.utils import global_then_local_main_first

from trl_prefix_share.core.reward.collator import ROW_GROUPS_KEY

RANKED_COLUMNS = ("response_ids", "response_ranks")


def ranked_pairs(num_responses: int, ranks: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """``(better, worse)`` index pairs, in lexicographic order: all ``i < j`` for a best-first list, or every pair with
    ``ranks[i] < ranks[j]`` (ties give no pair)."""
    if ranks is None:
        return [(i, j) for i in range(num_responses) for j in range(i + 1, num_responses)]
    if len(ranks) != num_responses:
        raise ValueError(f"`ranks` has {len(ranks)} entries for {num_responses} responses.")
    return [(i, j) for i in range(num_responses) for j in range(num_responses) if ranks[i] < ranks[j]]


def binarize_ranked(example: dict[str, Any]) -> list[dict[str, Any]]:
    """The stock preference examples (``prompt``/``chosen``/``rejected``) that one ranked example stands for, in the
    order the ranked collator lays its pairs out."""
    responses = example["responses"]
    pairs = ranked_pairs(len(responses), example.get("ranks"))
    head = {"prompt": example["prompt"]} if "prompt" in example else {}
    return [{**head, "chosen": responses[i], "rejected": responses[j]} for i, j in pairs]


def is_ranked_dataset(column_names: Sequence[str]) -> bool:
    return "responses" in column_names or "response_ids" in column_names


def _tokenize_response(
    processing_class: PreTrainedTokenizerBase, example: dict[str, Any], response: Any, add_eos: bool
) -> list[int]:
    """Token ids of prompt + response, as stock ``RewardTrainer`` tokenizes a chosen or rejected response: EOS appended
    to standard text that lacks it, the chat template applied (with the example's tools and template kwargs) to
    conversations."""
    if add_eos and not response.endswith(processing_class.eos_token):
        response = response + processing_class.eos_token
    full = example["prompt"] + response if "prompt" in example else response
    if isinstance(full, str):
        return _tokenize(processing_class, full)["input_ids"]
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
    return _tokenize(processing_class, full, **kwargs)["input_ids"]


def prepare_ranked_dataset(
    dataset: Dataset | IterableDataset,
    processing_class: PreTrainedTokenizerBase,
    max_length: int | None,
    dataset_name: str,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Tokenize ranked lists into ``response_ids``/``response_ranks``, drop responses longer than ``max_length`` (stock
    drops every pair that contains one) and examples left without a pair."""
    map_kwargs: dict[str, Any] = {}
    if isinstance(dataset, Dataset):
        map_kwargs["num_proc"] = num_proc
    column_names = get_dataset_column_names(dataset)

    def tokenize(example: dict[str, Any]) -> dict[str, Any]:
        responses = example["responses"]
        add_eos = isinstance(responses[0], str)
        ids = [_tokenize_response(processing_class, example, response, add_eos) for response in responses]
        return {"response_ids": ids}

    def select(example: dict[str, Any]) -> dict[str, Any]:
        ids = example["response_ids"]
        ranks = next((r for r in (example.get("response_ranks"), example.get("ranks")) if r is not None), None)
        ranks = list(range(len(ids))) if ranks is None else ranks
        if len(ranks) != len(ids):
            raise ValueError(f"A {dataset_name} example has {len(ranks)} ranks for {len(ids)} responses.")
        keep = [k for k, seq in enumerate(ids) if max_length is None or len(seq) <= max_length]
        return {"response_ids": [ids[k] for k in keep], "response_ranks": [ranks[k] for k in keep]}

    with global_then_local_main_first():
        if "response_ids" not in column_names:
            if isinstance(dataset, Dataset):
                map_kwargs["desc"] = f"Tokenizing {dataset_name} dataset"
            dataset = dataset.map(tokenize, **map_kwargs)
        if isinstance(dataset, Dataset):
            map_kwargs["desc"] = f"Ranking {dataset_name} dataset"
        dataset = dataset.map(select, **map_kwargs)
        if isinstance(dataset, Dataset):
            map_kwargs["desc"] = f"Dropping {dataset_name} examples without a pair"
        dataset = dataset.filter(
            lambda example: bool(ranked_pairs(len(example["response_ids"]), example["response_ranks"])), **map_kwargs
        )
    return dataset


@dataclass
class DataCollatorForRankedPreference:
    """Expands ranked examples into stock TRL's reward batch of their pairs, ``[better rows; worse rows]``, and tags
    every row with its example (``ROW_GROUPS_KEY``) so that each prompt becomes one document.

    The padded rows repeat responses that appear in several pairs; only the packed layout is run, where each distinct
    response is one branch (repeated rows are scored from the same branch, which makes them bit-identical).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        pairs: list[dict[str, list[int]]] = []
        owners: list[int] = []
        for index, example in enumerate(examples):
            ids = example["response_ids"]
            for better, worse in ranked_pairs(len(ids), example.get("response_ranks")):
                pairs.append({"chosen_ids": ids[better], "rejected_ids": ids[worse]})
                owners.append(index)
        if not pairs:
            raise ValueError("A ranked batch has no pair: every example needs two responses of different rank.")
        batch = DataCollatorForPreference(self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)(pairs)
        batch[ROW_GROUPS_KEY] = torch.tensor(owners + owners)
        return batch


def ranked_from_pairs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ranked examples from pairwise data with repeated prompts (``prompt``/``chosen``/``rejected`` rows): per prompt,
    its distinct responses ranked by the number of pairs they win (``ranks`` = minus the wins, so ties give no pair).

    A convenience for data collected as pairwise comparisons of several responses (e.g. PandaLM); it trains a
    Bradley-Terry model on the win-count order, which may differ from the individual pairs.
    """
    wins: dict[Any, dict[Any, int]] = {}
    prompts: dict[Any, Any] = {}
    for row in rows:
        key = json.dumps(row["prompt"], sort_keys=True)
        prompts[key] = row["prompt"]
        counts = wins.setdefault(key, {})
        counts[json.dumps(row["chosen"])] = counts.get(json.dumps(row["chosen"]), 0) + 1
        counts.setdefault(json.dumps(row["rejected"]), 0)
    examples = []
    for key, counts in wins.items():
        order = sorted(counts, key=lambda response: -counts[response])
        examples.append(
            {
                "prompt": prompts[key],
                "responses": [json.loads(response) for response in order],
                "ranks": [-counts[response] for response in order],
            }
        )
    return examples
