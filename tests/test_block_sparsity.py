"""FlexAttention's block mask from the layout's block summaries: every block it leaves out is empty, every block it
marks full is full (checked against the dense rule on real packed layouts), the kernels give the same attention as
with the dense construction, and a 16k-token prompt with 16 branches never builds a dense mask."""

from __future__ import annotations

import pytest
import torch

from trl_prefix_share.core.attention import flex_packed, sdpa_packed
from trl_prefix_share.core.attention.block_sparsity import block_visibility
from trl_prefix_share.core.attention.packed_layout import PackedAttentionLayout
from trl_prefix_share.core.layout import SequenceSpec, make_document, pack_documents

BLOCK = 16  # small blocks: many of them straddle branches, documents and row padding


def layout(
    prompts: list[int],
    responses: list[list[int]],
    budget: int | None,
    multiple: int | None = None,
    system=0,
    kernel: str = "flex",
):
    """Documents of random prompts (``system`` common tokens in front of every prompt: one prefix tree)."""
    generator = torch.Generator().manual_seed(sum(prompts) + len(responses))
    common = torch.randint(5, 99, (system,), generator=generator)
    documents, row = [], 0
    for prompt, lengths in zip(prompts, responses, strict=True):
        shared = torch.cat([common, torch.randint(5, 99, (prompt,), generator=generator)])
        sequences = []
        for length in lengths:
            tokens = torch.cat([shared, torch.randint(5, 99, (length,), generator=generator)])
            sequences.append(SequenceSpec(tokens, system + prompt, row))
            row += 1
        documents.append(make_document(sequences))
    width = system + max(p + max(r) for p, r in zip(prompts, responses, strict=True)) + 1
    buckets = kernel == "sdpa"
    packed = pack_documents(documents, row, width, 0, budget, pad_to_multiple_of=multiple, sdpa_buckets=buckets)
    return PackedAttentionLayout(packed, kernel)


def dense_rule(layout: PackedAttentionLayout, window: int | None) -> torch.Tensor:
    """``[rows, T, T]``: the packed attention rule pair by pair, from node ancestry rather than subtree ends (what
    `build_block_mask`'s mask_mod reads): key not after the query and the key's node on the query's chain of nodes.
    A node's parent is the nearest earlier node of its tree that ends at the depth where it starts (anything in
    between lies in the parent's subtree, deeper)."""
    doc, branch, pos = layout.document_ids, layout.branch_ids, layout.position_ids
    rows, length = doc.shape
    index = torch.arange(length)
    visible = torch.zeros(rows, length, length, dtype=torch.bool)
    for r in range(rows):
        parent = {}  # node -> parent node, from the depth-first order: a node's parent is the nearest open node
        nodes = [(int(d), int(b)) for d, b in zip(doc[r], branch[r], strict=True)]
        starts = [i for i in range(length) if nodes[i][0] >= 0 and (i == 0 or nodes[i] != nodes[i - 1])]
        depth_of = {}
        for i in starts:
            node = nodes[i]
            depth = int(pos[r, i])  # positions of a tree are its depths plus one offset
            candidates = [s for s in starts if s < i and nodes[s][0] == node[0] and depth_of[nodes[s]][1] == depth]
            parent[node] = nodes[candidates[-1]] if candidates else None
            depth_of[node] = (depth, depth + sum(1 for j in range(i, length) if nodes[j] == node))
        for q in range(length):
            if nodes[q][0] < 0:
                visible[r, q, q] = True
                continue
            chain, node = set(), nodes[q]
            while node is not None:
                chain.add(node)
                node = parent[node]
            for k in range(q + 1):
                visible[r, q, k] = nodes[k] in chain
    if window is not None:
        visible &= (pos[:, :, None] - pos[:, None, :] < window) | (doc[:, :, None] < 0)
    return visible & (index[None, None, :] <= index[None, :, None])


def per_block(mask: torch.Tensor, reduce: str) -> torch.Tensor:
    rows, length, _ = mask.shape
    blocks = -(-length // BLOCK)
    padded = torch.zeros(rows, blocks * BLOCK, blocks * BLOCK, dtype=torch.bool)
    padded[:, :length, :length] = mask
    tiles = padded.view(rows, blocks, BLOCK, blocks, BLOCK).permute(0, 1, 3, 2, 4).reshape(rows, blocks, blocks, -1)
    if reduce == "any":
        return tiles.any(dim=-1)
    valid = torch.zeros(blocks * BLOCK, dtype=torch.bool)
    valid[:length] = True
    inside = (valid.view(blocks, BLOCK)[:, None, :, None] & valid.view(blocks, BLOCK)[None, :, None, :]).reshape(
        blocks, blocks, -1
    )
    return (tiles | ~inside).all(dim=-1) & inside.all(dim=-1)


LAYOUTS = {
    "one document, 4 branches": ([40], [[9, 30, 17, 5]], None, None),
    "several documents per row": ([12, 33, 3, 20], [[4, 20], [7, 7, 50], [30, 2], [18]], None, None),
    "several rows, padded to 16": ([25, 9, 40], [[10, 40], [3, 3, 3, 3], [22, 5]], 90, 16),
    "long branches": ([5], [[70, 64, 33]], None, 32),
    "a prefix tree: system prompt, prompts, responses": ([20, 3, 41], [[9, 30], [5, 5, 60], [17]], None, None, 150),
    "a prefix tree over several rows": ([12, 33, 3], [[4, 20], [7, 50], [30, 2]], 260, 16, 90),
}


@pytest.mark.parametrize("window", [None, 7, 40])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_blocks_left_out_are_empty_and_full_blocks_full(name, window):
    packed = layout(*LAYOUTS[name])
    possible, full = block_visibility(packed.span_ends, packed.position_ids, window, BLOCK)
    rule = dense_rule(packed, window)
    any_pair, all_pairs = per_block(rule, "any"), per_block(rule, "all")
    assert bool((any_pair <= possible).all()), "a block with visible pairs was left out"
    assert bool((full <= all_pairs).all()), "a block marked full holds a masked pair"
    assert bool(full.any()) == bool(all_pairs.any()) or window is not None
    # Tight where blocks do not straddle: at most a few more blocks than the dense rule finds. A tree's nodes of a
    # few tokens each put several nodes (an ancestor's keys among them) in one block, so its bound is looser.
    slack = 2.0 if "tree" in name else 1.5
    assert int(possible.sum()) <= int(any_pair.sum()) * slack + 4


def test_branches_longer_than_a_block_skip_each_other():
    packed = layout([5], [[64, 64]], None, None)  # prefix 4 tokens, branches of 65 / 64: whole blocks apart
    possible, _ = block_visibility(packed.span_ends, packed.position_ids, None, BLOCK)
    second_branch_block, first_branch_block = 6, 2  # queries of branch 2, keys of branch 1 only
    assert not bool(possible[0, second_branch_block, first_branch_block])
    assert bool(possible[0, second_branch_block, 0])  # the shared prefix's block is attended


@pytest.mark.parametrize("window", [None, 9])
def test_same_attention_as_the_dense_construction(window, monkeypatch):
    packed = layout([40, 12], [[9, 30, 17], [50, 4]], None, 128)
    rows, length = packed.document_ids.shape
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(rows, 2, length, 8, generator=generator) for _ in range(3))
    ours = flex_packed.packed_flex_attention(query, key, value, packed, None, window, compiled=False)
    dense = torch.where(dense_rule(packed, window)[:, None], 0.0, float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=dense).transpose(1, 2)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_a_16k_prompt_with_16_branches_builds_no_dense_mask(monkeypatch):
    from torch.nn.attention import flex_attention

    def refuse(*args, **kwargs):
        raise AssertionError("a dense [T, T] mask was built")

    monkeypatch.setattr(flex_attention, "create_mask", refuse)
    packed = layout([16384], [[64] * 16], None, 128)
    length = packed.document_ids.size(1)
    assert length == -(-(16384 - 1 + 16 * 65) // 128) * 128  # prompt once, 16 branches of 65, padded to 128
    mask = flex_packed.build_block_mask(packed, None, torch.device("cpu"))
    blocks = length // 128
    assert tuple(mask.kv_num_blocks.shape) == (1, 1, blocks)
    visited = int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())
    assert visited < blocks * (blocks + 1) // 2  # block-sparse: under the causal triangle
    assert int(mask.full_kv_num_blocks.sum()) > 0.9 * (128 * 129 // 2)  # the prompt's blocks run without the mask_mod


@pytest.mark.parametrize(("window", "explicit"), [(9, False), (None, True), (9, True)])
def test_cpu_kernel_cuts_a_masked_trunk_into_query_blocks(window, explicit, monkeypatch):
    """A trunk group that needs a mask (window, explicit softmax) runs in blocks of query slots, each with a mask of
    only the keys it can see; outputs and gradients equal SDPA with the dense rule, and no mask is [trunk, trunk]."""
    packed = layout([150, 12], [[9, 30, 17], [50, 4]], None, 8, system=20, kernel="sdpa")
    monkeypatch.setattr(sdpa_packed, "QUERY_BLOCK", 32)
    shapes = []
    original = sdpa_packed.bucket_mask

    def recording(*args, **kwargs):
        mask = original(*args, **kwargs)
        if args[0]["trunk"]:
            shapes.append(tuple(mask.shape[-2:]))
        return mask

    monkeypatch.setattr(sdpa_packed, "bucket_mask", recording)
    rows, length = packed.document_ids.shape
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(rows, 2, length, 8, generator=generator, requires_grad=True) for _ in range(3))
    weights = torch.randn(rows, length, 2, 8, generator=generator)
    real = packed.document_ids >= 0
    if explicit:
        ours = sdpa_packed.packed_explicit_attention(query, key, value, packed, None, 0.0, window)
    else:
        ours = sdpa_packed.packed_sdpa_attention(query, key, value, packed, None, 0.0, window)
    dense = torch.where(dense_rule(packed, window)[:, None], 0.0, float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=dense).transpose(1, 2)
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)
    ours_grads = torch.autograd.grad((ours[real] * weights[real]).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected[real] * weights[real]).sum(), (query, key, value))
    for actual, wanted in zip(ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=1e-5)
    trunk = max(int(b["query_pos"].size(1)) for b in packed.buckets if b["trunk"])
    assert trunk > 4 * 32  # the trunk (system prompt, first prompt, first branch) spans several blocks
    assert len(shapes) >= 5 and max(q for q, _ in shapes) <= 32
    assert max(k for _, k in shapes) <= (trunk if window is None else 32 + window - 1)
