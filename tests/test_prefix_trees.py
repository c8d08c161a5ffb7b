"""Prefix trees: prompts that start alike share those tokens across documents (layout, positions, which models take
them), and DPO / ORPO / GRPO with one system prompt in front of every prompt match stock TRL.

Every other equivalence test runs trees too wherever a batch's prompts start alike (hh's "\\n\\nHuman:", the chat
template's head); the tests here make the common part long and assert that the batch really is one deep tree.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, load_dataset_rows
from datasets import Dataset
from equivalence import assert_equivalent, first_batch

from trl_prefix_share.core.layout import SequenceSpec, make_document, pack_documents
from trl_prefix_share.core.packing import PACKED_KEY
from trl_prefix_share.core.tree_support import sees_position_differences_only

SYSTEM = [1, 2, 3, 4, 5]


def _document(prompt, responses, first_row, offset=0):
    tokens = SYSTEM + prompt
    return make_document(
        [
            SequenceSpec(torch.tensor(tokens + response), len(tokens), first_row + i, position_offset=offset)
            for i, response in enumerate(responses)
        ]
    )


def test_a_common_system_prompt_is_laid_out_once_as_a_tree():
    """Three prompts behind one system prompt, two of them sharing their next token: root, inner nodes, leaves."""
    documents = [
        _document([7, 8], [[9, 9], [10]], 0),
        _document([7, 6], [[11], [12, 13]], 2),
        _document([20], [[21], [22]], 4),
    ]
    packed = pack_documents(documents, 6, 12, 0, prefix_tree=True, min_shared_tokens=1)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 9, 8, 10, 7, 6, 11, 6, 12, 13, 5, 20, 21, 20, 22]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 5, 6, 7, 6, 7, 8, 4, 5, 6, 5, 6]]
    assert packed["document_ids"].unique().tolist() == [0]  # one tree
    # Subtree ends: the root spans the row, "5 7" (shared by four sequences) up to index 17, each leaf itself.
    assert packed["span_ends"][0, [0, 4, 5, 6, 9, 17]].tolist() == [22, 17, 11, 9, 11, 22]
    assert packed["token_weights"][0, [0, 4, 5, 6]].tolist() == [6, 4, 2, 1]  # stock rows holding each token
    one_level = pack_documents(documents, 6, 12, 0)
    assert (one_level["document_ids"] >= 0).sum() == 31 > 22


def test_different_prompts_share_a_node_only_from_the_minimum_on():
    """The five-token system prompt above: kept at a minimum of 5 (the root holds 4 tokens plus the next node's 1 when
    the root alone is too short), left out at 6, where each prompt is its own one-level document again (each pair
    still sharing its prompt); a prompt repeated by two documents is shared whatever its length."""
    documents = [_document([7, 8], [[9, 9], [10]], 0), _document([7, 6], [[11], [12, 13]], 2)]
    one_level = pack_documents(documents, 4, 12, 0)
    at_five = pack_documents(documents, 4, 12, 0, prefix_tree=True, min_shared_tokens=5)
    # root [1..5, 7] minus its last token: 5 tokens, one node for both prompts, then each prompt's own head
    assert at_five["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 9, 8, 10, 7, 6, 11, 6, 12, 13]]
    at_six = pack_documents(documents, 4, 12, 0, prefix_tree=True, min_shared_tokens=6)
    assert at_six["input_ids"].tolist() == one_level["input_ids"].tolist()
    repeated = [_document([7, 8], [[9], [10]], 0), _document([7, 8], [[11], [12]], 2)]
    shared = pack_documents(repeated, 4, 10, 0, prefix_tree=True, min_shared_tokens=100)
    assert shared["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 8, 10, 8, 11, 8, 12]]


def test_a_minimum_below_one_is_refused_with_the_fix():
    import types

    from trl_prefix_share.core.options import prefix_share_arguments

    assert prefix_share_arguments(types.SimpleNamespace()).prefix_tree_min_shared_tokens == 32
    with pytest.raises(ValueError, match=r"prefix_tree_min_shared_tokens=0: give 1 or more .*prefix_tree=False"):
        prefix_share_arguments(types.SimpleNamespace(prefix_tree_min_shared_tokens=0))


def test_a_document_is_never_parted_by_a_node_left_out():
    """One document whose two prompts differ after three tokens (truncated differently), next to another sharing
    those three: the short node is kept, since without it the document would lay out its common tokens twice, more
    than its own one-level layout."""
    first = make_document(
        [SequenceSpec(torch.tensor([1, 2, 3, 4, 9]), 4, 0), SequenceSpec(torch.tensor([1, 2, 3, 5, 9]), 4, 1)]
    )
    second = make_document([SequenceSpec(torch.tensor([1, 2, 3, 6, 7, 8]), 5, 2)])
    packed = pack_documents([first, second], 3, 6, 0, prefix_tree=True, min_shared_tokens=32)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 9, 3, 5, 9, 3, 6, 7, 8]]
    alone = pack_documents([first], 2, 6, 0)
    assert (alone["document_ids"] >= 0).sum() == 8  # its one-level layout: [1, 2, 3] once, each branch after it


def test_left_padded_prompts_merge_only_where_positions_may_shift():
    """Online RL numbers positions by column, so a left-padded prompt starts at its padding: one node for two prompts
    of different padding needs one numbering, a shift of each sequence's positions that only rotary models allow."""
    documents = [_document([7, 8], [[9], [10]], 0, offset=0), _document([7], [[11], [12]], 2, offset=1)]
    kept = pack_documents(documents, 4, 10, 0, prefix_tree=True, min_shared_tokens=1)
    assert kept["document_ids"].unique().tolist() == [0, 1]  # two trees, each numbered as stock numbers it
    assert kept["position_ids"][kept["document_ids"] == 1].min() == 1
    shifted = pack_documents(documents, 4, 10, 0, prefix_tree=True, shift_positions=True, min_shared_tokens=1)
    assert shifted["document_ids"].unique().tolist() == [0]
    assert (shifted["document_ids"] >= 0).sum() < (kept["document_ids"] >= 0).sum()
    # Each sequence keeps consecutive positions: the second prompt's are all moved by one constant (-1).
    assert shifted["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 6, 7, 5, 6, 5, 6]


def test_which_models_may_shift_positions(tokenizer):
    """Fixed-table rotary models see position differences only; a length-dependent rope table or learned absolute
    positions do not."""
    assert sees_position_differences_only(build_tiny_model("llama", len(tokenizer)))
    dynamic = build_tiny_model("llama", len(tokenizer), rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert not sees_position_differences_only(dynamic)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert not sees_position_differences_only(gpt2)


SYSTEM_PROMPT = (
    "You are a careful assistant. Follow the user's instructions exactly, keep answers short, cite no sources you "
    "have not seen, and say so plainly when you do not know. Prefer plain words to jargon, and examples to rules."
)


def system_rows(count: int) -> Dataset:
    """Conversational UltraFeedback pairs, one system message in front of every prompt (as instruction recipes add);
    texts shortened to keep CPU runs quick."""
    rows = load_dataset_rows("ultrafeedback", count)
    return Dataset.from_list(
        [
            {
                "prompt": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": r["prompt"][:160]},
                ],
                "chosen": [{"role": "assistant", "content": r["chosen"][:300]}],
                "rejected": [{"role": "assistant", "content": r["rejected"][:300]}],
            }
            for r in rows
        ]
    )


def assert_one_deep_tree(packed: dict, pairs: int) -> None:
    """Every prompt of the batch in one tree, with nodes below the root that are not leaves (a depth > 1)."""
    document_ids, branch_ids = packed["document_ids"], packed["branch_ids"]
    assert document_ids[document_ids >= 0].unique().numel() == 1
    assert int(branch_ids.max()) > 2 * pairs  # root + one node per prompt + two leaves per pair


def test_dpo_with_a_system_prompt_matches_stock(model_dir, tokenizer):
    """Mistral's 24-token sliding window is shorter than the system prompt: windows reach across tree nodes. (Llama
    runs trees in test_dpo_equivalence's conversational data, whose chat-template head every prompt shares.)"""
    from test_dpo_equivalence import make_pair

    stock, ours = make_pair(model_dir("mistral"), tokenizer, system_rows(4))
    stock_batch, our_batch = first_batch(stock, 4), first_batch(ours, 4)
    assert_one_deep_tree(our_batch[PACKED_KEY], 4)
    assert our_batch[PACKED_KEY]["input_ids"].numel() < 0.6 * stock_batch["input_ids"].numel()
    assert_equivalent(stock, ours, stock_batch, our_batch)


def test_orpo_scores_a_shared_system_prompt_for_every_chosen_response(model_dir, tokenizer):
    """ORPO's NLL term scores prompt + chosen: one packed position of the system prompt is scored for all three chosen
    sequences (and for no rejected one)."""
    from test_orpo_cpo import assert_equivalent as paired_equivalent
    from test_orpo_cpo import first_batch as paired_batch
    from test_orpo_cpo import make_pair

    stock, ours = make_pair("orpo", model_dir("llama"), tokenizer, system_rows(3))
    ours_batch = paired_batch(ours, 3)
    packed = ours_batch[PACKED_KEY]
    assert_one_deep_tree(packed, 3)
    assert packed["label_index"].numel() > packed["label_index"].unique().numel()  # positions scored several times
    paired_equivalent(stock, ours, paired_batch(stock, 3), ours_batch)


def test_grpo_with_a_tool_system_prompt_matches_stock(model_dir, tokenizer, monkeypatch):
    """Prompts of different lengths behind one system prompt, left-padded by stock to different columns: one tree,
    numbered from its first prompt's padding (rotary angles in float64: see `equivalence.float64_rotary_forward`;
    the construction probe checks the float32 shift against stock's own padding noise)."""
    import transformers.models.llama.modeling_llama as llama
    from equivalence import rotary_in_float64
    from online_setup import generate_and_score, generation_batch
    from test_online_equivalence import build, masked_relative
    from trl import GRPOConfig, GRPOTrainer

    from trl_prefix_share.trainers.online.grpo import PrefixSharedGRPOTrainer

    rotary_in_float64(monkeypatch, llama)
    prompts = [row["prompt"][:2] for row in system_rows(3)]
    dataset = Dataset.from_list([{"prompt": prompt} for prompt in prompts])
    fields = dict(beta=0.1, num_iterations=2)
    stock = build(GRPOTrainer, GRPOConfig, model_dir("llama"), tokenizer, dataset, **fields)
    ours = build(PrefixSharedGRPOTrainer, GRPOConfig, model_dir("llama"), tokenizer, dataset, **fields)
    assert ours.prefix_share_packing.prefix_tree and ours.prefix_share_packing.shift_positions
    from trl_prefix_share.core.online import rows as online_rows

    trees = []

    pack = online_rows.pack_documents

    def recorded(*args, **kwargs):
        packed = pack(*args, **kwargs)
        trees.append(packed["document_ids"][packed["document_ids"] >= 0].unique().numel())
        return packed

    monkeypatch.setattr(online_rows, "pack_documents", recorded)
    batch = generation_batch(dataset, 3)
    expected, actual = generate_and_score(stock, batch), generate_and_score(ours, batch)
    assert trees and max(trees) == 1  # the three prompts in one tree, whatever their padding
    assert bool((expected["prompt_mask"] == 0).any())
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        assert masked_relative(actual[key], expected[key], expected["completion_mask"]) <= 1e-5, key
    assert_equivalent(stock, ours, expected, expected)
