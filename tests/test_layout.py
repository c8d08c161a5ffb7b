"""The packed layout, checked against the unpacked sequences it stands for (pure tensor code, no model).

Every check derives what each packed position may see from the documented attention rule (same document, key not
after the query in its row, key in the shared trunk or in the query's own branch) and compares it with the unpacked
sequence, which the test builds itself. Nothing is compared against the code under test.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import DATA, DATASETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_prefix_share.core.attention.sdpa_packed import bucket_mask
from trl_prefix_share.core.layout import (
    IGNORE_INDEX,
    SequenceSpec,
    assign_rows,
    make_document,
    pack_documents,
    shareable_length,
)
from trl_prefix_share.core.layout.tree import MIN_SHARED_TOKENS
from trl_prefix_share.core.packing import PACKED_KEY, PackingOptions
from trl_prefix_share.core.preference.collator import PrefixSharedPreferenceCollator

PAD_ID = 99  # never drawn as a real token below, so a padding token posing as a real one cannot go unnoticed


# -- independent reference ------------------------------------------------------------------------------------------


def expected_shared_length(sequences: list[tuple[list[int], int]]) -> int:
    """Longest common prefix inside every prompt, 0 below 2 tokens or for a single sequence (the documented rule)."""
    if len(sequences) < 2:
        return 0
    limit = min(min(start for _, start in sequences), min(len(tokens) for tokens, _ in sequences))
    shared = 0
    while shared < limit and all(tokens[shared] == sequences[0][0][shared] for tokens, _ in sequences):
        shared += 1
    return shared if shared >= 2 else 0


def expected_doc_tokens(sequences: list[tuple[list[int], int]], share: bool = True) -> int:
    """Tokens of a document: the shared head once, then one branch per distinct sequence (identical sequences, same
    tokens and same prompt split, are scored from one branch when sharing)."""
    shared = expected_shared_length(sequences) if share else 0
    head = shared - 1 if shared >= 2 else 0
    if share:
        sequences = list(dict.fromkeys((tuple(tokens), start) for tokens, start in sequences))
    return head + sum(len(tokens) - head for tokens, _ in sequences)


def expected_row_tokens(
    sequences: list[tuple[list[int], int, int]], share: bool = True, min_shared: int = MIN_SHARED_TOKENS
) -> int:
    """Tokens of a row whose sequences ``(tokens, completion_start, document)`` are merged into prefix trees, counted
    without building one. Position j of a sequence can be shared by the sequences that agree on their first j + 2
    tokens within their prompts (the last common token heads every child). Along a sequence, each run of positions
    with one such set is a node, laid out once when the set has one prompt, when ``min_shared`` positions have
    gathered since the last laid-out node (positions left out gather into the next), or when the next position
    parts two sequences of one document. Every other position is the sequence's own (shared only with identical
    copies in its document)."""
    if not share:
        return sum(len(tokens) for tokens, _, _ in sequences)
    unique = {(doc, tuple(tokens), start) for tokens, start, doc in sequences}
    limit = {seq: min(seq[2], len(seq[1])) for seq in unique}

    def sharing(seq, j: int) -> frozenset:
        if j + 2 > limit[seq]:
            return frozenset()
        return frozenset(other for other in unique if j + 2 <= limit[other] and other[1][: j + 2] == seq[1][: j + 2])

    def parts_a_document(members: frozenset, j: int) -> bool:
        after = {}
        for member in members:
            next_set = sharing(member, j + 1)
            after.setdefault(member[0], set()).add(next_set if len(next_set) > 1 else member)
        return any(len(sets) > 1 for sets in after.values())

    slots = set()
    for seq in unique:
        runs: list[tuple[frozenset, list[int]]] = []
        for j in range(len(seq[1])):
            members = sharing(seq, j)
            if len(members) < 2:
                break
            if runs and runs[-1][0] == members:
                runs[-1][1].append(j)
            else:
                runs.append((members, [j]))
        gathered: list[int] = []
        for members, positions in runs:
            gathered += positions
            one_prompt = len({other[1][: limit[other]] for other in members}) == 1
            if one_prompt or len(gathered) >= min_shared or parts_a_document(members, positions[-1]):
                slots.update(("node", members, i) for i in gathered)
                gathered = []
        own = [*gathered, *range(sum(len(positions) for _, positions in runs), len(seq[1]))]
        slots.update(("own", seq, i) for i in own)
    return len(slots)


def visible_keys(span: list[int], query: int) -> list[int]:
    """Keys of ``query`` in its row under the attention rule (the key's subtree holds the query), in row order."""
    if span[query] < 0:
        return []
    return [key for key in range(query + 1) if span[key] > query]


def check_layout(
    packed: dict,
    documents: list[list[tuple[list[int], int, int]]],
    virtual_length: int,
    share: bool = True,
    max_row_tokens: int | None = None,
    pad_to_multiple_of: int | None = None,
    pad_token_id: int = PAD_ID,
    sliding_window: int = 3,
    min_shared: int = MIN_SHARED_TOKENS,
) -> None:
    """Check a packed layout against its documents: ``documents[d]`` lists ``(tokens, completion_start, virtual_row)``.

    ``completion_start`` is where the stock completion mask turns on; the stock (shifted) label of position ``j`` is
    ``tokens[j + 1]`` when ``j + 1 >= completion_start``.
    """
    input_ids = packed["input_ids"]
    rows, length = input_ids.shape
    width = virtual_length - 1
    num_virtual = sum(len(doc) for doc in documents)
    by_row = {row: (tokens, start) for doc in documents for tokens, start, row in doc}
    assert sorted(by_row) == list(range(num_virtual))

    ids = input_ids.tolist()
    pos = packed["position_ids"].tolist()
    docs = packed["document_ids"].tolist()
    branches = packed["branch_ids"].tolist()
    spans = packed["span_ends"].tolist()
    labels = packed["shift_labels"].tolist()
    for name in ("position_ids", "document_ids", "branch_ids", "span_ends", "shift_labels"):
        assert packed[name].shape == (rows, length), name

    # (d) row shape: padded to the multiple, no longer than the longest row needs, budget respected.
    if pad_to_multiple_of:
        assert length % pad_to_multiple_of == 0
    used = [sum(d >= 0 for d in docs[r]) for r in range(rows)]
    multiple = pad_to_multiple_of or 1
    assert length == -(-max(used) // multiple) * multiple
    doc_sizes = [expected_doc_tokens([(t, s) for t, s, _ in doc], share) for doc in documents]
    # Greedy first fit in batch order by one-level document sizes, computed here independently.
    members, fill = [[]], 0
    for index, size in enumerate(doc_sizes):
        if max_row_tokens is not None and members[-1] and fill + size > max_row_tokens:
            members, fill = [*members, []], 0
        members[-1].append(index)
        fill += size
    if max_row_tokens is not None:
        assert max(used) <= max_row_tokens
    assert rows == len(members)
    # Tokens per row: every prompt prefix common to several sequences of the row laid out once, nothing added.
    for r, row_docs in enumerate(members):
        row_sequences = [(tokens, start, d) for d in row_docs for tokens, start, _ in documents[d]]
        assert used[r] == expected_row_tokens(row_sequences, share, min_shared), r
    for r in range(rows):
        # Trees are contiguous in batch order and padding sits at the end of the row.
        real = [d for d in docs[r] if d >= 0]
        assert docs[r][: len(real)] == real and real == sorted(real)
        for i in range(len(real), length):
            assert ids[r][i] == pad_token_id and labels[r][i] == IGNORE_INDEX and branches[r][i] < 0
            assert spans[r][i] < 0

    # (a)/(b) every real position sees exactly an unpacked prefix, and its keys see prefixes of that same prefix.
    contexts: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r in range(rows):
        for i in range(length):
            keys = visible_keys(spans[r], i)
            contexts[r, i] = [(ids[r][k], pos[r][k]) for k in keys]
    full_sequences = {tuple(zip(tokens, range(len(tokens)), strict=True)) for tokens, _ in by_row.values()}
    seen_full = set()
    for (r, i), context in contexts.items():
        if docs[r][i] < 0:
            continue
        assert [p for _, p in context] == list(range(len(context))), (r, i, context)
        own = [(tokens, start) for d in members[r] for tokens, start, _ in documents[d]]
        prefix_of = [tokens for tokens, _ in own if [t for t, _ in context] == tokens[: len(context)]]
        assert prefix_of, f"row {r} index {i}: its context is no prefix of any sequence of its row"
        for key in visible_keys(spans[r], i):
            assert contexts[r, key] == context[: pos[r][key] + 1], (r, i, key)
        if tuple(context) in full_sequences:
            seen_full.add(tuple(context))
    # Every sequence is laid out in full (its last token sees the whole sequence).
    assert seen_full == full_sequences

    # (c) labels: each stock-labelled position appears exactly once, with the right context and next token (a packed
    # position may serve several identical sequences).
    label_index = packed["label_index"].tolist()
    target_index = packed["target_index"].tolist()
    assert len(label_index) == len(target_index)
    flat_labels = [label for row in labels for label in row]
    assert sorted(set(label_index)) == [k for k, label in enumerate(flat_labels) if label != IGNORE_INDEX]
    expected_targets = {
        row * width + j for row, (tokens, start) in by_row.items() for j in range(len(tokens) - 1) if j + 1 >= start
    }
    assert len(set(target_index)) == len(target_index)
    assert set(target_index) == expected_targets
    per_row = Counter()
    for flat, target in zip(label_index, target_index, strict=True):
        r, i = divmod(flat, length)
        vrow, j = divmod(target, width)
        tokens, start = by_row[vrow]
        assert contexts[r, i] == list(zip(tokens[: j + 1], range(j + 1), strict=True)), (vrow, j)
        assert flat_labels[flat] == tokens[j + 1]
        per_row[vrow] += 1
    branch_lengths = packed["branch_lengths"].tolist()
    for vrow, (tokens, start) in by_row.items():
        stock_count = sum(1 for j in range(len(tokens) - 1) if j + 1 >= start)
        assert per_row[vrow] == stock_count == branch_lengths[vrow]

    # (e) SDPA buckets give every real query exactly its visible keys (each once) and no empty softmax row.
    if "attention_buckets" not in packed:
        return
    flat_docs = [d for row in docs for d in row]
    for window in (None, sliding_window):
        queried = []
        for bucket in packed["attention_buckets"]:
            query_index = bucket["query_index"].tolist()
            key_index = bucket["key_index"].tolist()
            mask = kernel_mask(bucket, window)
            groups, lq, lk = mask.shape
            assert mask.dtype == torch.bool
            assert bucket["query_index"].shape == (groups, lq) and bucket["key_index"].shape == (groups, lk)
            valid = set(bucket["query_slots"].tolist())
            assert bucket["query_targets"].tolist() == [query_index[s // lq][s % lq] for s in sorted(valid)]
            allowed = mask.tolist()
            for g in range(groups):
                for i in range(lq):
                    row_mask = allowed[g][i]
                    if g * lq + i not in valid:
                        assert any(row_mask), f"padded query slot ({g}, {i}) has an empty softmax row"
                        continue
                    flat_q = query_index[g][i]
                    assert flat_docs[flat_q] >= 0, "a padding token is a query"
                    queried.append(flat_q)
                    r, q = divmod(flat_q, length)
                    keys = visible_keys(spans[r], q)
                    if window is not None:  # distance in positions, as transformers measures it unpacked
                        keys = [k for k in keys if pos[r][q] - pos[r][k] < window]
                    expected = Counter(r * length + k for k in keys)
                    got = Counter(key_index[g][k] for k in range(lk) if row_mask[k])
                    assert got == expected, (window, g, i)
        real = [k for k, d in enumerate(flat_docs) if d >= 0]
        assert sorted(queried) == real, "every real token must be a query in exactly one group"


def kernel_mask(bucket: dict, sliding_window: int | None) -> torch.Tensor:
    """``[G, Lq, Lk]``: the key slots each query slot of a bucket attends to in the SDPA kernel.

    ``bucket_mask`` returning ``None`` means the kernel calls SDPA with ``is_causal=True`` (top-left causal).
    """
    groups, lq = bucket["query_index"].shape
    lk = bucket["key_index"].size(1)
    mask = bucket_mask(bucket, sliding_window)
    if mask is None:
        return torch.ones(lq, lk, dtype=torch.bool).tril().expand(groups, lq, lk)
    assert mask.dim() == 4 and mask.size(1) == 1
    return mask[:, 0].expand(groups, lq, lk)


# -- hypothesis strategy --------------------------------------------------------------------------------------------

VOCAB = st.integers(1, 4)  # tiny vocabulary: accidental common prefixes and repeats are frequent


@st.composite
def document_sequences(draw) -> list[tuple[list[int], int]]:
    """K sequences of one prompt; some keep a different prompt (keep_end tails, keep_start cuts, an edited token)."""
    base = draw(st.lists(VOCAB, min_size=0, max_size=12))
    sequences = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["same", "same", "same", "tail", "cut", "edit", "fresh"]))
        prompt = list(base)
        if kind == "tail" and prompt:  # keep_end: a shorter tail of the prompt
            prompt = prompt[draw(st.integers(1, len(prompt))) :]
        elif kind == "cut" and prompt:  # keep_start: the prompt cut short
            prompt = prompt[: draw(st.integers(0, len(prompt) - 1))]
        elif kind == "edit" and prompt:
            index = draw(st.integers(0, len(prompt) - 1))
            prompt[index] = draw(VOCAB)
        elif kind == "fresh":
            prompt = draw(st.lists(VOCAB, min_size=0, max_size=6))
        response = draw(st.lists(VOCAB, min_size=1, max_size=8))
        sequences.append((prompt + response, len(prompt)))
    return sequences


@st.composite
def layouts(draw):
    docs = draw(st.lists(document_sequences(), min_size=1, max_size=5))
    system = draw(st.lists(VOCAB, min_size=0, max_size=6))  # a head common to every prompt: one tree for all
    docs = [[(system + tokens, len(system) + start) for tokens, start in doc] for doc in docs]
    share = draw(st.booleans()) if draw(st.integers(0, 4)) == 0 else True
    num_virtual = sum(len(doc) for doc in docs)
    order = draw(st.permutations(list(range(num_virtual))))
    it = iter(order)
    documents = [[(tokens, start, next(it)) for tokens, start in doc] for doc in docs]
    longest = max(len(tokens) for doc in docs for tokens, _ in doc)
    virtual_length = longest + draw(st.integers(0, 3))
    largest = max(expected_doc_tokens(doc, share) for doc in docs)
    max_row_tokens = draw(st.one_of(st.none(), st.integers(largest, largest + 3 * longest)))
    pad_to_multiple_of = draw(st.sampled_from([None, 1, 4, 8, 16]))
    min_shared = draw(st.sampled_from([1, 1, 2, 3, 5, MIN_SHARED_TOKENS]))  # nodes of different prompts, kept or not
    return documents, share, virtual_length, max_row_tokens, pad_to_multiple_of, min_shared


def build(documents, share, virtual_length, max_row_tokens, pad_to_multiple_of, sdpa_buckets=True, min_shared=None):
    specs = [
        make_document(
            [SequenceSpec(torch.tensor(tokens, dtype=torch.long), start, row) for tokens, start, row in doc],
            share_prefix=share,
        )
        for doc in documents
    ]
    return pack_documents(
        specs,
        num_virtual_rows=sum(len(doc) for doc in documents),
        virtual_length=virtual_length,
        pad_token_id=PAD_ID,
        max_row_tokens=max_row_tokens,
        pad_to_multiple_of=pad_to_multiple_of,
        sdpa_buckets=sdpa_buckets,
        prefix_tree=share,
        min_shared_tokens=MIN_SHARED_TOKENS if min_shared is None else min_shared,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.integers(1, 8))
def test_packed_layout_reproduces_every_sequence(case, sliding_window):
    documents, share, virtual_length, max_row_tokens, pad_to_multiple_of, min_shared = case
    packed = build(documents, share, virtual_length, max_row_tokens, pad_to_multiple_of, min_shared=min_shared)
    check_layout(
        packed,
        documents,
        virtual_length,
        share,
        max_row_tokens,
        pad_to_multiple_of,
        sliding_window=sliding_window,
        min_shared=min_shared,
    )


@settings(max_examples=30, deadline=None)
@given(layouts())
def test_layout_without_buckets_has_no_buckets_and_same_rows(case):
    documents, share, virtual_length, max_row_tokens, pad_to_multiple_of, min_shared = case
    packed = build(
        documents, share, virtual_length, max_row_tokens, pad_to_multiple_of, sdpa_buckets=False, min_shared=min_shared
    )
    assert "attention_buckets" not in packed
    check_layout(packed, documents, virtual_length, share, max_row_tokens, pad_to_multiple_of, min_shared=min_shared)


# -- hand-written cases ---------------------------------------------------------------------------------------------


def test_shared_layout_of_one_pair_is_the_documented_one():
    prompt, chosen, rejected = [5, 6, 7], [8, 9], [10]
    documents = [[(prompt + chosen, 3, 0), (prompt + rejected, 3, 1)]]
    packed = build(documents, True, virtual_length=6, max_row_tokens=None, pad_to_multiple_of=None)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert packed["shift_labels"].tolist() == [[-100, -100, 8, 9, -100, 10, -100]]
    assert packed["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    assert packed["target_index"].tolist() == [0 * 5 + 2, 0 * 5 + 3, 1 * 5 + 2]
    check_layout(packed, documents, 6)


def test_divergent_prompts_are_laid_out_unshared():
    # keep_end truncation kept different prompt tails: nothing in common, so both sequences are laid out whole.
    documents = [[([1, 2, 3, 4, 5], 3, 0), ([2, 3, 4, 6], 2, 1)]]
    packed = build(documents, True, virtual_length=5, max_row_tokens=None, pad_to_multiple_of=None)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 2, 3, 4, 6]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    check_layout(packed, documents, 5)


def test_assign_rows_is_greedy_first_fit_in_order():
    assert assign_rows([3, 4, 2, 5], None) == [[0, 1, 2, 3]]
    assert assign_rows([], None) == []
    assert assign_rows([], 10) == []
    assert assign_rows([3, 4, 2, 5], 7) == [[0, 1], [2, 3]]
    assert assign_rows([3, 4, 2, 5], 9) == [[0, 1, 2], [3]]
    # In order, no look-ahead: the 1 after the 6 does not go back into the first row.
    assert assign_rows([4, 6, 1], 6) == [[0], [1], [2]]
    assert assign_rows([6, 6, 6], 6) == [[0], [1], [2]]
    # An oversized document gets its own row.
    assert assign_rows([2, 9, 2], 5) == [[0], [1], [2]]


def _spec(tokens, start, row=0):
    return SequenceSpec(torch.tensor(tokens, dtype=torch.long), start, row)


def test_shareable_length_caps_at_the_prompt_and_needs_two_tokens():
    # Identical sequences share only their prompt, never a completion token.
    assert shareable_length([_spec([1, 2, 3, 4, 5], 3), _spec([1, 2, 3, 4, 5], 3, 1)]) == 3
    # The shorter prompt is the cap.
    assert shareable_length([_spec([1, 2, 3, 4, 5], 4), _spec([1, 2, 3, 4, 6], 2, 1)]) == 2
    assert shareable_length([_spec([1, 2, 3, 9], 3), _spec([1, 2, 4, 9], 3, 1)]) == 2
    # Fewer than two common tokens: nothing is shared.
    assert shareable_length([_spec([1, 2, 3, 9], 3), _spec([1, 5, 3, 9], 3, 1)]) == 0
    assert shareable_length([_spec([1, 2, 3], 1), _spec([1, 2, 3], 1, 1)]) == 0
    assert shareable_length([_spec([1, 2, 3], 0), _spec([1, 2, 3], 0, 1)]) == 0
    # A single sequence has nothing to share with.
    assert shareable_length([_spec([1, 2, 3, 4], 3)]) == 0
    # Three branches: the common part of all of them.
    three = [_spec([1, 2, 3, 4, 7], 4), _spec([1, 2, 3, 4, 8], 4, 1), _spec([1, 2, 3, 5, 9], 4, 2)]
    assert shareable_length(three) == 3


def test_share_prefix_false_gives_unshared_documents():
    sequences = [_spec([1, 2, 3, 4, 5], 3, 0), _spec([1, 2, 3, 6], 3, 1)]
    assert make_document(sequences, share_prefix=True).shared_length == 3
    document = make_document(sequences, share_prefix=False)
    assert document.shared_length == 0
    assert document.num_tokens == 9
    packed = pack_documents([document], num_virtual_rows=2, virtual_length=5, pad_token_id=PAD_ID)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 1, 2, 3, 6]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    check_layout(packed, [[([1, 2, 3, 4, 5], 3, 0), ([1, 2, 3, 6], 3, 1)]], 5, share=False)


def test_sequence_without_completion_tokens_is_laid_out_and_unlabelled():
    # keep_start truncation can cut the whole completion of one sequence.
    documents = [[([1, 2, 3, 4], 4, 0), ([1, 2, 3, 5, 6], 3, 1)]]
    packed = build(documents, True, virtual_length=5, max_row_tokens=None, pad_to_multiple_of=None)
    check_layout(packed, documents, 5)
    assert packed["branch_lengths"].tolist() == [0, 2]


# -- the collator on real tokenized data ----------------------------------------------------------------------------


def _tokenized_examples(tokenizer, limit: int) -> list[dict]:
    examples = []
    with open(DATA / DATASETS["pandalm"], encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            examples.append(
                {
                    "prompt_ids": tokenizer(row["prompt"])["input_ids"],
                    "chosen_ids": tokenizer(row["chosen"])["input_ids"],
                    "rejected_ids": tokenizer(row["rejected"])["input_ids"],
                }
            )
            if len(examples) == limit:
                break
    return examples


def _stock_documents(batch: dict) -> list[list[tuple[list[int], int, int]]]:
    """Unpad the stock batch here (independently of the collator) and pair row b with row B + b."""
    sequences = []
    for row in range(batch["input_ids"].size(0)):
        length = int(batch["attention_mask"][row].sum())
        tokens = batch["input_ids"][row, :length].tolist()
        completion = batch["completion_mask"][row, :length].tolist()
        start = completion.index(1) if 1 in completion else length
        assert all(completion[start:]) and not any(completion[:start])
        sequences.append((tokens, start, row))
    half = len(sequences) // 2
    return [[sequences[b], sequences[half + b]] for b in range(half)]


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize(
    "options",
    [
        PackingOptions(),
        PackingOptions(max_row_tokens=200, pad_to_multiple_of=16),
        PackingOptions(share_prefix=False, max_row_tokens=192),
        PackingOptions(sdpa_buckets=False),
    ],
    ids=["one-row", "rows", "unshared", "no-buckets"],
)
def test_collator_matches_stock_batch_and_packs_it_exactly(tokenizer, truncation_mode, options):
    examples = _tokenized_examples(tokenizer, 8)
    max_length = 96  # some pairs fit (shared), others are truncated (keep_end: divergent prompt tails)
    stock = DataCollatorForPreference(
        pad_token_id=tokenizer.pad_token_id, max_length=max_length, truncation_mode=truncation_mode
    )
    collator = PrefixSharedPreferenceCollator(
        DataCollatorForPreference(
            pad_token_id=tokenizer.pad_token_id, max_length=max_length, truncation_mode=truncation_mode
        ),
        pad_token_id=tokenizer.pad_token_id,
        options=options,
    )
    ours = collator(examples)
    expected = stock(examples)
    assert set(ours) == set(expected) | {PACKED_KEY}
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
    # Truncation happened, so the test exercises it.
    assert int(expected["attention_mask"].sum(1).max()) == max_length

    documents = _stock_documents(expected)
    check_layout(
        ours[PACKED_KEY],
        documents,
        expected["input_ids"].size(1),
        share=options.share_prefix,
        max_row_tokens=options.max_row_tokens,
        pad_to_multiple_of=options.pad_to_multiple_of,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert ("attention_buckets" in ours[PACKED_KEY]) == options.sdpa_buckets
    shared = [expected_shared_length([(t, s) for t, s, _ in doc]) for doc in documents]
    if options.share_prefix:
        assert any(shared), "no pair shared its prompt: the test would not exercise sharing"
        # The packed rows hold fewer tokens than the stock sequences.
        real = int((ours[PACKED_KEY]["document_ids"] >= 0).sum())
        assert real < int(expected["attention_mask"].sum())
    if truncation_mode == "keep_end":
        # keep_end kept different prompt tails for pairs whose responses differ in length: they must not share.
        assert not all(shared)


def test_label_start_scores_the_shared_prompt_once_for_the_first_sequence():
    """ORPO-style scoring of prompt + chosen: shared prompt positions are scored for the first sequence only."""
    prompt, chosen, rejected = [5, 6, 7, 8], [9, 10], [11]
    first = SequenceSpec(torch.tensor(prompt + chosen), completion_start=4, virtual_row=0, label_start=1)
    second = SequenceSpec(torch.tensor(prompt + rejected), completion_start=4, virtual_row=1)
    doc = make_document([first, second])
    assert doc.shared_length == 4
    width = 6
    packed = pack_documents([doc], num_virtual_rows=2, virtual_length=width + 1, pad_token_id=PAD_ID)
    targets = sorted(packed["target_index"].tolist())
    # first sequence: positions 0..4 predict tokens 1..5; second: position 3 predicts its completion token
    assert targets == [0, 1, 2, 3, 4, width + 3]
    labels = packed["shift_labels"].view(-1)[packed["label_index"]].tolist()
    by_target = dict(zip(packed["target_index"].tolist(), labels, strict=True))
    assert [by_target[t] for t in range(5)] == (prompt + chosen)[1:]
    assert by_target[width + 3] == rejected[0]


def test_a_later_sequence_scoring_its_prompt_stops_sharing():
    first = SequenceSpec(torch.tensor([5, 6, 7, 8, 9]), completion_start=4, virtual_row=0)
    second = SequenceSpec(torch.tensor([5, 6, 7, 8, 10]), completion_start=4, virtual_row=1, label_start=2)
    assert shareable_length([first, second]) == 2


def test_last_index_points_at_each_sequence_last_token():
    sequences = [
        SequenceSpec(torch.tensor([5, 6, 7, 9]), completion_start=3, virtual_row=0),
        SequenceSpec(torch.tensor([5, 6, 7, 9]), completion_start=3, virtual_row=2),  # identical: same last token
        SequenceSpec(torch.tensor([5, 6, 7, 11, 12]), completion_start=3, virtual_row=1),
    ]
    packed = pack_documents([make_document(sequences)], 3, 6, pad_token_id=PAD_ID)
    ids, positions = packed["input_ids"].view(-1), packed["position_ids"].view(-1)
    last = packed["last_index"].tolist()
    assert last[0] == last[2]
    assert ids[last[0]] == 9 and positions[last[0]] == 3
    assert ids[last[1]] == 12 and positions[last[1]] == 4
