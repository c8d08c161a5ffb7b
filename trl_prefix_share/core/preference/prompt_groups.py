"""One document per distinct prompt: all sequences of a batch with identical prompt tokens share that prompt once.

A layout rule (used by the DPO trainers' `group_by_prompt` and by the construction probe's K=4 document), so it
lives in the core; the sampler that puts such pairs in one batch is `trainers.dpo.grouping`.
"""

from __future__ import annotations

from trl_prefix_share.core.layout import DocumentSpec, SequenceSpec, make_document
from trl_prefix_share.core.preference.collator import pair_documents


def prompt_key(sequence: SequenceSpec) -> tuple:
    """The prompt of a (truncated) sequence, its images' fingerprint then its tokens: sequences with equal keys can
    share their whole prompt (equal text with different images gives equal tokens, so the images are part of it)."""
    return (sequence.prompt_images, *sequence.tokens[: sequence.completion_start].tolist())


def _document_tokens(members: list[SequenceSpec]) -> int:
    """Tokens ``make_document(members)`` occupies, for members with identical prompt tokens (computed in O(K)).

    Their common prefix is the whole prompt, so the shared length is the prompt length unless a later member is
    scored earlier (``label_start``); identical sequences take one branch.
    """
    shared = min([members[0].completion_start] + [m.first_label for m in members[1:]])
    head = shared - 1 if shared >= 2 else 0
    unique = {(tuple(m.tokens.tolist()), m.first_label) for m in members}  # members share one prompt_images
    return head + sum(len(tokens) - head for tokens, _ in unique)


class GroupByPrompt:
    """``group_documents`` hook of ``PrefixSharedPreferenceCollator``: one document per distinct prompt of a batch.

    Args:
        max_row_tokens: token budget of a packed row; a prompt's sequences are split over several documents (in row
            order) so that each fits. ``None``: one document per prompt.

    With ``share_prefix=False`` (ablations) documents are the plain pairs, as without grouping.
    """

    def __init__(self, max_row_tokens: int | None = None) -> None:
        self.max_row_tokens = max_row_tokens

    def __call__(self, sequences: list[SequenceSpec], share_prefix: bool) -> list[DocumentSpec]:
        if not share_prefix:
            return pair_documents(sequences, share_prefix)
        groups: dict[tuple[int, ...], list[SequenceSpec]] = {}
        for sequence in sequences:
            groups.setdefault(prompt_key(sequence), []).append(sequence)
        documents = []
        for members in groups.values():
            documents.extend(make_document(part) for part in self._fit(members))
        return documents

    def _fit(self, members: list[SequenceSpec]) -> list[list[SequenceSpec]]:
        """Cut a prompt's sequences into consecutive parts whose documents fit the row budget."""
        if self.max_row_tokens is None:
            return [members]
        parts: list[list[SequenceSpec]] = [[]]
        for sequence in members:
            if parts[-1] and _document_tokens(parts[-1] + [sequence]) > self.max_row_tokens:
                parts.append([])
            parts[-1].append(sequence)
        return parts
