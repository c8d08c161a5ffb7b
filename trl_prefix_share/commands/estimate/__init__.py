"""Savings estimator: tokens stock TRL would run on a preference dataset vs prefix sharing, without a model.

    trl-prefix-share estimate --dataset FILE_OR_HUB_NAME --tokenizer NAME_OR_DIR [--batch-size 8 16] [--json OUT]

The examples are tokenized the way TRL 1.16's `DPOTrainer._prepare_dataset` does (implicit prompt extracted, EOS
appended to plain-text responses, prompt / prompt+chosen / prompt+rejected tokenized separately and the completion
starting where they diverge, examples whose prompt fills `max_length` dropped), but in batches with the fast tokenizer
and with the text the three share encoded once (see `PairEncoder`). Batches are consecutive slices of the permutation
the Trainer's seeded sampler draws in the first epoch, so the totals are those a single-process run logs as
`prefix_share/stock_tokens` and `prefix_share/tokens` (with several processes the same per-device batches are spread
over them).
"""

from trl_prefix_share.commands.estimate.command import build_parser, run_estimate
from trl_prefix_share.commands.estimate.counting import count_tokens, estimate_savings, sampler_order
from trl_prefix_share.commands.estimate.loading import load_preference_dataset, load_tokenizer
from trl_prefix_share.commands.estimate.report import format_report
from trl_prefix_share.commands.estimate.results import LengthStats, PairLengths, SavingsEstimate
from trl_prefix_share.commands.estimate.tokenization import PairEncoder, split_point, tokenize_pairs

__all__ = [
    "LengthStats",
    "PairEncoder",
    "PairLengths",
    "SavingsEstimate",
    "build_parser",
    "count_tokens",
    "estimate_savings",
    "format_report",
    "load_preference_dataset",
    "load_tokenizer",
    "run_estimate",
    "sampler_order",
    "split_point",
    "tokenize_pairs",
]
