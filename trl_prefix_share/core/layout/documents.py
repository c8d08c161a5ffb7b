"""Documents: the sequences of a stock batch that may share their prompt, and how much of it they share.

A *document* holds K >= 1 sequences that start with the same prompt. Its shared prefix is laid out once and each
sequence continues in its own *branch* (see ``pack.py`` for the row layout). Pure tensor code, no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
PAD_DOCUMENT = -1


@dataclass(frozen=True)
class SequenceSpec:
    """One already-truncated sequence of the stock layout.

    Attributes:
        tokens: 1D token ids of prompt + completion, exactly as the stock batch holds them (no padding).
        completion_start: index in ``tokens`` of the first completion token (``len(tokens)`` if none); only tokens
            before it can be shared with other sequences.
        virtual_row: row of this sequence in the stock ``[num_sequences, L]`` batch.
        label_start: index of the first token that is predicted (scored); defaults to ``completion_start``. ORPO's
            NLL term scores the prompt too (``label_start=1``); shared prompt positions are then scored for the
            document's first sequence only.
        position_offset: column of ``tokens[0]`` in the stock row, and its position id there. 0 for right-padded
            batches; the left padding of the row for online RL's left-padded prompts, whose stock forward numbers
            positions by column (transformers' default ``arange``), so the packed positions match them exactly.
        prompt_images: a fingerprint of the images in the prompt ("" for text). Image placeholder tokens are the
            same ids whatever the image, so two prompts are the same only if their tokens *and* this are equal.
    """

    tokens: torch.Tensor
    completion_start: int
    virtual_row: int
    label_start: int | None = None
    position_offset: int = 0
    prompt_images: str = ""

    @property
    def first_label(self) -> int:
        return self.completion_start if self.label_start is None else self.label_start


@dataclass(frozen=True)
class DocumentSpec:
    """Sequences that may share their prompt; ``shared_length`` tokens are identical at the start of all of them.

    ``aliases[i]`` is the index of the first sequence identical to sequence ``i`` (``i`` itself when unique): an
    identical sequence is not laid out again but scored from the same branch, which is exact to the bit (identical
    chosen and rejected responses then get identical rewards, as in stock TRL) and saves its tokens.
    """

    sequences: tuple[SequenceSpec, ...]
    shared_length: int
    aliases: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.aliases:
            object.__setattr__(self, "aliases", tuple(range(len(self.sequences))))

    @property
    def branches(self) -> list[int]:
        """Indices of the sequences laid out as branches (the unique ones), in order."""
        return [i for i, alias in enumerate(self.aliases) if alias == i]

    @property
    def branch_start(self) -> int:
        """Index in each sequence where its branch starts (the repeated last shared token), 0 when unshared."""
        return self.shared_length - 1 if self.shared_length >= 2 else 0

    @property
    def num_tokens(self) -> int:
        """Tokens this document occupies in a packed row."""
        start = self.branch_start
        return start + sum(len(self.sequences[i].tokens) - start for i in self.branches)


def shareable_length(sequences: list[SequenceSpec]) -> int:
    """Longest prefix that all sequences have in common and that lies inside every prompt.

    Only prompt tokens are shared. A shared position is scored for the first sequence only, so sharing stops where
    any later sequence starts being scored. Returns 0 when fewer than 2 tokens could be shared (nothing would be
    saved).
    """
    if len(sequences) < 2:
        return 0
    if any(seq.prompt_images != sequences[0].prompt_images for seq in sequences[1:]):
        return 0  # same placeholder tokens, different images: nothing is the same
    limit = min(
        min(seq.completion_start for seq in sequences),
        min(seq.first_label for seq in sequences[1:]),
        min(len(seq.tokens) for seq in sequences),
    )
    if limit < 2:
        return 0
    head = sequences[0].tokens[:limit]
    same = torch.ones(limit, dtype=torch.bool)
    for seq in sequences[1:]:
        same &= seq.tokens[:limit] == head
    shared = int(same.cumprod(0).sum())
    return shared if shared >= 2 else 0


def identical_sequences(sequences: list[SequenceSpec]) -> tuple[int, ...]:
    """For each sequence, the index of the first sequence with the same tokens, images, prompt split and scored span.

    One dictionary lookup per sequence (G completions of a prompt: G lookups, not G^2 comparisons)."""
    first: dict[tuple, int] = {}
    aliases = []
    for index, seq in enumerate(sequences):
        key = (seq.completion_start, seq.first_label, seq.prompt_images, seq.tokens.numpy().tobytes())
        aliases.append(first.setdefault(key, index))
    return tuple(aliases)


def make_document(sequences: list[SequenceSpec], share_prefix: bool = True) -> DocumentSpec:
    """Group sequences into one document: identical ones scored from one branch, the common prompt prefix shared
    when ``share_prefix`` (with ``share_prefix=False`` every sequence is laid out on its own, for ablations)."""
    if not share_prefix:
        return DocumentSpec(sequences=tuple(sequences), shared_length=0)
    return DocumentSpec(
        sequences=tuple(sequences), shared_length=shareable_length(sequences), aliases=identical_sequences(sequences)
    )
