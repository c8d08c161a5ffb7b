"""What the estimator returns: per-pair token lengths and one epoch's token counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from trl_prefix_share.commands.estimate.memory import MemoryEstimate


@dataclass(frozen=True)
class LengthStats:
    """Mean, median, 95th percentile and maximum of a token length (before truncation)."""

    mean: float
    median: float
    p95: float
    max: int

    @classmethod
    def of(cls, values: np.ndarray) -> LengthStats:
        if values.size == 0:
            return cls(0.0, 0.0, 0.0, 0)
        return cls(float(values.mean()), float(np.median(values)), float(np.percentile(values, 95)), int(values.max()))


@dataclass
class SavingsEstimate:
    """Token counts of one training epoch over the dataset, stock TRL vs prefix sharing.

    `stock_tokens` is the sum of `input_ids.numel()` of TRL's padded `[2B, L]` batches, `unpadded_tokens` the
    prompt+chosen and prompt+rejected tokens without padding (prompt counted twice), `tokens` what the prefix-shared
    packed rows hold (prefix trees: every prompt prefix common to several sequences of a row once; identical
    chosen/rejected laid out once), `one_level_tokens` the same rows sharing only each pair's own prompt.
    With `group_by_prompt`, ours are the batches of the prompt-grouped sampler, each prompt's sequences one document
    (stock keeps its own shuffled batches). `mean_batch_ratio` averages stock/ours over our batches (stock padding
    the same batch, as the trainer logs); `prompt_share` is the prompt's part of `unpadded_tokens`.
    Length statistics are before truncation; `spliced_checked` counts the pairs whose spliced tokenization was
    checked against TRL's (0: TRL's was used).
    """

    examples: int
    batch_size: int
    batches: int
    stock_tokens: int
    unpadded_tokens: int
    tokens: int
    one_level_tokens: int
    mean_batch_ratio: float
    prompt: LengthStats
    chosen: LengthStats
    rejected: LengthStats
    prompt_share: float
    conversational: bool
    implicit_prompt: bool
    dropped: int
    truncated: int
    identical: int
    empty_responses: int
    max_length: int | None
    truncation_mode: str
    shuffle: bool
    seed: int
    pad_to_multiple_of: int | None = None
    max_row_tokens: int | None = None
    pad_rows_to_multiple_of: int | None = None
    spliced_checked: int = 0
    group_by_prompt: bool = False
    memory: MemoryEstimate | None = None  # predicted peak step memory, when the model's sizes were given
    #: The most sharing can speed a step up over packed-unshared on the model (`estimate.work`; with its sizes).
    compute_limit: float | None = None

    @property
    def token_ratio(self) -> float:
        """Stock TRL tokens per prefix-shared token: the upper end of the expected speedup."""
        return self.stock_tokens / max(self.tokens, 1)

    @property
    def sharing_ratio(self) -> float:
        """Unpadded, unshared tokens per prefix-shared token: what prompt sharing alone saves."""
        return self.unpadded_tokens / max(self.tokens, 1)

    @property
    def one_level_ratio(self) -> float:
        """Stock TRL tokens per token of one-level sharing (each prompt shared only by its own responses)."""
        return self.stock_tokens / max(self.one_level_tokens, 1)

    @property
    def speedup_range(self) -> tuple[float, float]:
        return (min(self.sharing_ratio, self.token_ratio), self.token_ratio)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            token_ratio=self.token_ratio,
            one_level_ratio=self.one_level_ratio,
            sharing_ratio=self.sharing_ratio,
            speedup_range=self.speedup_range,
            memory=None if self.memory is None else self.memory.to_dict(),
        )
        return data


@dataclass
class PairLengths:
    """Per-pair token lengths of a tokenized dataset (kept pairs only, in dataset order).

    `chosen_seq`/`rejected_seq` are the truncated prompt+response lengths of the stock batch, `document` the tokens
    the pair takes in a one-level packed row; `prompt_tokens` the prompt tokens of its chosen and rejected sequences
    (`tokenization.prompt_bytes`), from which prefix trees across pairs are counted; `sequence_digests` fingerprints
    of those two sequences and `prompt_keys` of the untruncated prompt, from which `group_by_prompt`'s batches and
    documents are built.
    """

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    chosen_seq: np.ndarray
    rejected_seq: np.ndarray
    prompt_seq: np.ndarray
    document: np.ndarray
    identical: np.ndarray
    conversational: bool
    implicit_prompt: bool
    dropped: int
    max_length: int | None
    truncation_mode: str
    spliced_checked: int = 0
    prompt_tokens: list[tuple[bytes, bytes]] | None = None
    sequence_digests: list[tuple[bytes, bytes]] | None = None
    prompt_keys: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.document)
