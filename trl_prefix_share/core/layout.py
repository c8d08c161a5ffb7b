"""Shared-prefix packed layout: tokenized sequences -> packed rows (pure tensor code, no model).

A *document* holds K >= 1 sequences that start with the same prompt. Its shared prefix is laid out once and each
sequence continues in its own *branch*:

    tokens    : p[0..s-2] | p[s-1] c[..] | p[s-1] r[..]
    positions : 0..s-2    | s-1 ..       | s-1 ..          (every branch restarts at s-1)

The last shared token heads every branch, so each position predicts exactly one next token of its own sequence and
a per-position ``shift_labels`` tensor scores the whole row. Documents are packed greedily into rows.

Every labelled packed position is mapped to its place in the *virtual* stock layout (TRL's padded ``[2B, L]`` batch,
shifted by one), so per-token results can be scattered back there and TRL's loss code runs unchanged.
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


def assign_rows(lengths: list[int], max_row_tokens: int | None, pack: bool = True) -> list[list[int]]:
    """Greedy first-fit in order: documents fill the current row until the next one would pass the budget.

    A document longer than the budget gets a row of its own (the trainer rejects such examples up front, so this is
    only reached by direct callers of the layout). ``pack=False`` gives every document its own row (the
    "sharing without packing" ablation).
    """
    if not pack:
        return [[index] for index in range(len(lengths))]
    if max_row_tokens is None:
        return [list(range(len(lengths)))] if lengths else []
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if current and used + length > max_row_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        rows.append(current)
    return rows


def _round_up(value: int, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return value
    return -(-value // multiple) * multiple


@dataclass
class _Segment:
    """A run of consecutive tokens of one sequence placed consecutively in a packed row."""

    source: int  # offset in the concatenated token source
    length: int
    dest: int  # flat offset in the packed rows
    position: int  # index in its sequence of its first token
    document: int
    branch: int  # 0: shared prefix
    sequence: int  # index of the sequence whose next tokens it predicts
    weight: int  # stock rows holding these tokens (all sequences of the document for a shared prefix)


@dataclass
class _Group:
    """One attention group: contiguous queries, and keys = [shared prefix, one branch] (positions 0, 1, ...)."""

    query_start: int
    query_length: int
    query_position: int
    shared_start: int
    shared_length: int
    branch_start: int


def _spans(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For runs of the given lengths laid end to end: each element's run id and its offset inside the run."""
    run = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return run, torch.arange(int(lengths.sum())) - starts[run]


def _attention_bucket(groups: list[_Group], trunk: bool) -> dict[str, torch.Tensor | bool]:
    """Batched index tensors of one SDPA call over a list of groups (no mask: see ``attention/sdpa_packed.py``).

    Keys of a group are [shared prefix, branch] and a key's slot equals its position, so query q may see key slot k
    iff ``k <= query_pos[q]``: valid queries never reach padded key slots, and a padded query slot (position 0) sees
    key slot 0 only, so no softmax row is empty. In a trunk group the queries are the keys, so the rule is plain
    causal attention. Padded query outputs are never scattered back.
    """
    table = torch.tensor(
        [
            [g.query_start, g.query_length, g.query_position, g.shared_start, g.shared_length, g.branch_start]
            for g in groups
        ]
    )
    q_start, q_len, q_pos, s_start, s_len, b_start = table.unbind(1)
    k_len = q_len if trunk else s_len + q_len
    slot_q = torch.arange(int(q_len.max()))[None, :]
    slot_k = torch.arange(int(k_len.max()))[None, :]
    query_valid = slot_q < q_len[:, None]
    key_valid = slot_k < k_len[:, None]
    query_index = torch.where(query_valid, q_start[:, None] + slot_q, 0)
    query_pos = torch.where(query_valid, q_pos[:, None] + slot_q, 0)
    in_shared = slot_k < s_len[:, None]
    key_index = torch.where(in_shared, s_start[:, None] + slot_k, b_start[:, None] + slot_k - s_len[:, None])
    key_index = torch.where(key_valid, key_index, 0)
    query_slots = query_valid.reshape(-1).nonzero().squeeze(1)
    return {
        "trunk": trunk,
        "query_index": query_index,
        "key_index": key_index,
        "query_pos": query_pos,
        "key_valid": key_valid,
        "query_slots": query_slots,
        "query_targets": query_index.reshape(-1)[query_slots],
    }


def pack_documents(
    documents: list[DocumentSpec],
    num_virtual_rows: int,
    virtual_length: int,
    pad_token_id: int,
    max_row_tokens: int | None = None,
    pad_to_multiple_of: int | None = None,
    sdpa_buckets: bool = True,
    pack: bool = True,
    source_index: bool = False,
) -> dict[str, torch.Tensor | list[dict[str, torch.Tensor]]]:
    """Lay documents out in packed rows.

    Python runs once per segment (a shared prefix or a branch) to describe the layout; the tokens themselves are
    moved by a fixed number of tensor operations.

    Args:
        documents: the documents, in batch order.
        num_virtual_rows / virtual_length: shape ``[num_virtual_rows, virtual_length]`` of the stock batch; labelled
            positions are mapped into its shifted ``[num_virtual_rows, virtual_length - 1]`` view.
        pad_token_id: id written into row padding.
        max_row_tokens: token budget per row (``None``: one row).
        pad_to_multiple_of: pad the row length to a multiple of this (bounds recompiles of compiled kernels).
        sdpa_buckets: also build the index/mask tensors of the per-group SDPA decomposition (CPU kernel).
        pack: ``False`` puts every document in its own row, rows padded to the longest (ablation baseline).
        source_index: also return ``source_index`` (needed by image prompts only).

    Returns a dict of tensors: ``input_ids``, ``position_ids``, ``shift_labels``, ``document_ids``, ``branch_ids``
    (all ``[rows, T]``), ``label_index`` (flat packed index of every labelled position, row-major) and
    ``target_index`` (its flat index in the shifted virtual layout), ``token_weights`` (``[rows, T]``, how many
    stock rows hold each packed token: weights of per-token statistics such as the MoE load-balancing loss, 0 on
    row padding), ``branch_lengths`` (labelled tokens per sequence, by virtual row), ``last_index`` (flat packed
    index of each sequence's last token, by virtual row: where a reward model reads its score), and
    ``source_index`` when asked (``[rows, T]``, flat index in the unshifted stock ``[num_virtual_rows, virtual_length]``
    batch of the token each packed position holds, -1 on row padding: how per-token stock inputs such as image
    features, multimodal positions or token types are gathered into the packed rows), and ``attention_buckets`` (a
    list) when ``sdpa_buckets``.
    """
    row_members = assign_rows([doc.num_tokens for doc in documents], max_row_tokens, pack)
    longest_row = max((sum(documents[i].num_tokens for i in row) for row in row_members), default=1)
    row_length = _round_up(longest_row, pad_to_multiple_of)
    num_rows = max(len(row_members), 1)

    sequences = [seq for doc in documents for seq in doc.sequences]
    source = torch.cat([seq.tokens for seq in sequences]) if sequences else torch.zeros(0, dtype=torch.long)
    first_sequence, source_start = [], []
    offset = 0
    for doc in documents:
        first_sequence.append(len(source_start))
        for seq in doc.sequences:
            source_start.append(offset)
            offset += len(seq.tokens)

    segments: list[_Segment] = []
    last_flat = [0] * len(sequences)
    trunk_groups: list[_Group] = []
    side_groups: list[_Group] = []
    for row, members in enumerate(row_members):
        dest = row * row_length
        for doc_index in members:
            doc = documents[doc_index]
            start = doc.branch_start
            first = first_sequence[doc_index]
            shared_dest = dest
            if start:  # shared prefix: scored, if at all, for the document's first sequence
                owner = first + doc.branches[0]
                weight = len(doc.sequences)
                segments.append(_Segment(source_start[owner], start, dest, 0, doc_index, 0, owner, weight))
                dest += start
            for branch, member in enumerate(doc.branches, start=1):
                index = first + member
                length = len(doc.sequences[member].tokens) - start
                weight = doc.aliases.count(member)
                segments.append(
                    _Segment(source_start[index] + start, length, dest, start, doc_index, branch, index, weight)
                )
                last_flat[index] = dest + length - 1
                if branch == 1:
                    trunk_groups.append(_Group(shared_dest, start + length, 0, shared_dest, start, dest))
                else:
                    side_groups.append(_Group(dest, length, start, shared_dest, start, dest))
                dest += length

    input_ids = torch.full((num_rows * row_length,), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(num_rows * row_length, dtype=torch.long)
    shift_labels = torch.full((num_rows * row_length,), IGNORE_INDEX, dtype=torch.long)
    document_ids = torch.full((num_rows * row_length,), PAD_DOCUMENT, dtype=torch.long)
    branch_ids = torch.full((num_rows * row_length,), PAD_DOCUMENT, dtype=torch.long)
    token_weights = torch.zeros(num_rows * row_length, dtype=torch.long)
    sources = torch.full((num_rows * row_length,), -1, dtype=torch.long)
    label_index = target_index = torch.zeros(0, dtype=torch.long)
    branch_lengths = torch.zeros(num_virtual_rows, dtype=torch.long)

    if segments:
        table = torch.tensor(
            [[s.source, s.length, s.dest, s.position, s.document, s.branch, s.sequence, s.weight] for s in segments]
        )
        (seg_source, seg_length, seg_dest, seg_position, seg_document, seg_branch, seg_sequence, seg_weight) = (
            table.unbind(1)
        )
        run, within = _spans(seg_length)
        src = seg_source[run] + within
        dst = seg_dest[run] + within
        pos = seg_position[run] + within
        # Position j of a sequence predicts its token j+1 when that token is a completion token.
        seq_info = torch.tensor([[len(q.tokens), q.first_label, q.virtual_row, q.position_offset] for q in sequences])
        owner = seg_sequence[run]
        input_ids[dst] = source[src]
        position_ids[dst] = pos + seq_info[owner, 3]
        document_ids[dst] = seg_document[run]
        branch_ids[dst] = seg_branch[run]
        token_weights[dst] = seg_weight[run]
        sources[dst] = seq_info[owner, 2] * virtual_length + seq_info[owner, 3] + pos

        next_pos = pos + 1
        labelled = (next_pos < seq_info[owner, 0]) & (next_pos >= seq_info[owner, 1])
        label_index = dst[labelled]
        shift_labels[label_index] = source[src[labelled] + 1]
        labelled_owner, labelled_pos = owner[labelled], pos[labelled]
        # Sequences identical to an earlier one are scored from its branch: same packed positions, their own rows.
        for doc_index, doc in enumerate(documents):
            for member, alias in enumerate(doc.aliases):
                if alias != member:
                    last_flat[first_sequence[doc_index] + member] = last_flat[first_sequence[doc_index] + alias]
                    same = labelled_owner == first_sequence[doc_index] + alias
                    label_index = torch.cat([label_index, label_index[same]])
                    labelled_owner = torch.cat(
                        [labelled_owner, labelled_owner[same].fill_(first_sequence[doc_index] + member)]
                    )
                    labelled_pos = torch.cat([labelled_pos, labelled_pos[same]])
        virtual_row = seq_info[labelled_owner, 2]
        target_index = virtual_row * (virtual_length - 1) + seq_info[labelled_owner, 3] + labelled_pos
        branch_lengths = torch.bincount(virtual_row, minlength=num_virtual_rows)

    last_index = torch.zeros(num_virtual_rows, dtype=torch.long)
    if sequences:
        last_index[torch.tensor([q.virtual_row for q in sequences])] = torch.tensor(last_flat)
    shape = (num_rows, row_length)
    batch: dict[str, torch.Tensor | list[dict[str, torch.Tensor]]] = {
        "input_ids": input_ids.view(shape),
        "position_ids": position_ids.view(shape),
        "shift_labels": shift_labels.view(shape),
        "document_ids": document_ids.view(shape),
        "branch_ids": branch_ids.view(shape),
        "token_weights": token_weights.view(shape),
        "label_index": label_index,
        "target_index": target_index,
        "branch_lengths": branch_lengths,
        "last_index": last_index,
    }
    if source_index:
        batch["source_index"] = sources.view(shape)
    if sdpa_buckets:
        buckets = [(trunk_groups, True), (side_groups, False)]
        batch["attention_buckets"] = [_attention_bucket(groups, trunk) for groups, trunk in buckets if groups]
    return batch


def move_to_device(value, device: torch.device):
    """A packed layout (nested dicts and lists of tensors) on ``device``."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {key: move_to_device(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [move_to_device(item, device) for item in value]
    return value
