"""The packed forward on tiny models (fp32, CPU), checked against the stock model run on each sequence alone.

The reference never touches the code under test: a plain ``sdpa`` copy of the same weights runs every sequence of the
stock batch by itself, unpadded, and its logits give the per-token log-probs. The packed side is switched exactly as
the trainer does it: ``add_fused_lm_head``, then ``enable_prefix_sharing``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers.masking_utils as masking_utils
from conftest import build_tiny_model, read_jsonl
from equivalence import RELATIVE_TOLERANCE, relative_difference
from transformers import AutoConfig, AutoModelForCausalLM
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

import trl_prefix_share.core.attention as attention
import trl_prefix_share.core.attention.packed_layout as packed_layout
import trl_prefix_share.core.attention.sdpa_packed as sdpa_packed
from trl_prefix_share.core.attention import layout_for_batch
from trl_prefix_share.core.model_support import UnsupportedModelError, enable_prefix_sharing
from trl_prefix_share.core.packing import PACKED_KEY, PackingOptions
from trl_prefix_share.core.preference.collator import PrefixSharedPreferenceCollator

MAX_LENGTH = 128
FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")

# family name -> (conftest family, config overrides). `mistral` has a 24-token sliding window (conftest);
# `qwen3-mixed` alternates sliding and full attention layers with a window much shorter than the sequences.
CASES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),
    "qwen3-mixed": (
        "qwen3",
        dict(use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    ),
}


# -- data -----------------------------------------------------------------------------------------------------------


def tokenized_pairs(tokenizer, name: str, limit: int, offset: int = 0) -> list[dict]:
    return [
        {
            "prompt_ids": tokenizer(row["prompt"])["input_ids"],
            "chosen_ids": tokenizer(row["chosen"])["input_ids"],
            "rejected_ids": tokenizer(row["rejected"])["input_ids"],
        }
        for row in read_jsonl(name, limit, offset)
    ]


@pytest.fixture(scope="module")
def examples(tokenizer):
    """Real pairs: long shared prompts, short and long answers; the last one is cut by keep_end into different tails."""
    pairs = tokenized_pairs(tokenizer, "pandalm", 2)
    pairs += tokenized_pairs(tokenizer, "pandalm", 1, offset=4)
    return pairs + tokenized_pairs(tokenizer, "pandalm", 1, offset=6)


def collate(tokenizer, examples, truncation_mode="keep_end", max_length=MAX_LENGTH, **options) -> dict:
    base = DataCollatorForPreference(
        pad_token_id=tokenizer.pad_token_id, max_length=max_length, truncation_mode=truncation_mode
    )
    collator = PrefixSharedPreferenceCollator(
        base, pad_token_id=tokenizer.pad_token_id, options=PackingOptions(**options)
    )
    return collator(examples)


# -- models ---------------------------------------------------------------------------------------------------------


def model_pair(case: str, vocab_size: int, kernel: str = "sdpa"):
    """(reference, packed): the same weights; the reference is a plain sdpa model, the other switched as the trainer."""
    family, overrides = CASES[case]
    reference = build_tiny_model(family, vocab_size, **overrides)
    reference.set_attn_implementation("sdpa")
    reference.eval()
    packed = copy.deepcopy(reference)
    add_fused_lm_head(packed, outputs=FUSED_OUTPUTS)
    enable_prefix_sharing(packed, kernel)
    return reference, packed


_REFERENCE_CACHE: dict = {}


def cached_reference_log_probs(case: str, model, batch: dict) -> torch.Tensor:
    """``reference_log_probs`` without grad, computed once per family and stock batch (packing options do not change
    the stock batch, so every layout of it is checked against the same numbers)."""
    ids, completion = batch["input_ids"], batch["completion_mask"]
    key = (case, tuple(ids.shape), ids.numpy().tobytes(), completion.numpy().tobytes())
    if key not in _REFERENCE_CACHE:
        with torch.no_grad():
            _REFERENCE_CACHE[key] = reference_log_probs(model, batch)
    return _REFERENCE_CACHE[key]


def reference_log_probs(model, batch: dict) -> torch.Tensor:
    """Each stock sequence alone, unpadded: log-prob of every completion token, in the shifted ``[2B, L-1]`` layout."""
    input_ids, attention_mask, completion_mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    rows, length = input_ids.shape
    per_row = []
    for row in range(rows):
        n = int(attention_mask[row].sum())
        out = torch.zeros(length - 1)
        if n >= 2:
            tokens = input_ids[row, :n]
            logits = model(input_ids=tokens[None], use_cache=False).logits[0, :-1].float()
            log_probs = logits.log_softmax(-1).gather(-1, tokens[1:, None])[:, 0]
            scored = completion_mask[row, 1:n].bool()
            out = torch.cat([torch.where(scored, log_probs, torch.zeros_like(log_probs)), out[n - 1 :]])
        per_row.append(out)
    return torch.stack(per_row)


def packed_outputs(model, batch: dict):
    """The trainer's call: the stock batch plus the packed layout."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        fused_lm_head=True,
        use_cache=False,
        **{PACKED_KEY: batch[PACKED_KEY]},
    )


def assert_log_probs_match(actual: torch.Tensor, expected: torch.Tensor, batch: dict) -> None:
    scored = batch["completion_mask"][:, 1:].bool()
    assert int(scored.sum()) > 0, "no completion token: the comparison would be empty"
    assert actual.shape == expected.shape
    assert torch.equal(actual[~scored], torch.zeros_like(actual[~scored])), "unscored positions must be 0"
    for row in range(actual.size(0)):
        if scored[row].any():
            diff = relative_difference(actual[row][scored[row]], expected[row][scored[row]])
            assert diff <= RELATIVE_TOLERANCE, f"sequence {row}: log-probs differ by {diff:.2e} relative"


def shared_pairs(batch: dict) -> int:
    """Pairs whose chosen and rejected rows hold the same prompt (the prompt tokens, those before the completion
    mask turns on, are equal), so the layout really shares inside the pair; keep_end tails may differ."""
    half = batch["input_ids"].size(0) // 2
    prompt = (batch["completion_mask"] == 0) & (batch["attention_mask"] == 1)
    prompts = [tuple(row[mask].tolist()) for row, mask in zip(batch["input_ids"], prompt, strict=True)]
    return sum(prompts[b] == prompts[half + b] for b in range(half))


def trees(batch: dict) -> int:
    """Prefix trees of the packed rows: fewer than the pairs when different pairs' prompts share their start."""
    return len(torch.unique(batch[PACKED_KEY]["document_ids"][batch[PACKED_KEY]["document_ids"] >= 0]))


LAYOUTS = {
    "one-row": dict(),  # all documents in one row
    "rows": dict(max_row_tokens=2 * MAX_LENGTH + 8, pad_to_multiple_of=16),  # several rows, padded
    # one row, every prompt behind one system prompt (20 tokens, below the default minimum): one tree over all pairs
    "tree": dict(prefix_tree_min_shared_tokens=2),
}
SYSTEM_PROMPT = "You are a careful assistant. Answer the question below in plain words, and say so when unsure.\n\n"


def with_system_prompt(tokenizer, examples: list[dict]) -> list[dict]:
    """The pairs with one system prompt in front of every prompt (what many instruction recipes add)."""
    system = tokenizer(SYSTEM_PROMPT)["input_ids"]
    return [{**example, "prompt_ids": system + example["prompt_ids"]} for example in examples]


# -- equivalence ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_sdpa_forward_matches_unpadded_sequences(tokenizer, examples, case, layout):
    reference, packed = model_pair(case, len(tokenizer))
    if layout == "tree":
        examples = with_system_prompt(tokenizer, examples)
    batch = collate(
        tokenizer, examples, truncation_mode="keep_start" if layout == "tree" else "keep_end", **LAYOUTS[layout]
    )
    rows = batch[PACKED_KEY]["input_ids"].size(0)
    assert rows == 1 if layout != "rows" else rows > 1
    if layout == "tree":
        assert trees(batch) == 1, "want every pair's prompt in one tree"
    else:
        assert 0 < shared_pairs(batch) < len(examples), "want both shared and (keep_end) unshared pairs"
    expected = cached_reference_log_probs(case, reference, batch)
    with torch.no_grad():
        outputs = packed_outputs(packed, batch)
    assert torch.equal(outputs.label_mask, batch["completion_mask"][:, 1:].bool())
    assert_log_probs_match(outputs.log_probs, expected, batch)


@pytest.mark.parametrize("case", ["llama", "mistral"])
def test_packed_sdpa_forward_keep_start_and_unshared(tokenizer, examples, case):
    reference, packed = model_pair(case, len(tokenizer))
    for batch in (
        collate(tokenizer, examples, truncation_mode="keep_start", max_length=96),
        collate(tokenizer, examples, share_prefix=False, max_row_tokens=MAX_LENGTH),
    ):
        expected = cached_reference_log_probs(case, reference, batch)
        with torch.no_grad():
            assert_log_probs_match(packed_outputs(packed, batch).log_probs, expected, batch)


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_flex_forward_matches_unpadded_sequences(tokenizer, examples, case):
    """FlexAttention (uncompiled: CPU has no flex backward, so forward only), several documents in several rows."""
    reference, packed = model_pair(case, len(tokenizer), kernel="flex_eager")
    batch = collate(tokenizer, examples, sdpa_buckets=False, **LAYOUTS["rows"])
    assert batch[PACKED_KEY]["input_ids"].size(0) > 1
    expected = cached_reference_log_probs(case, reference, batch)
    with torch.no_grad():
        outputs = packed_outputs(packed, batch)
    assert_log_probs_match(outputs.log_probs, expected, batch)


@pytest.mark.parametrize("case", ["mistral", "qwen3-mixed"])
def test_packed_sdpa_gradients_match_unpadded_sequences(tokenizer, examples, case):
    reference, packed = model_pair(case, len(tokenizer))
    reference.train()
    packed.train()
    # Two shared pairs in one row, a keep_end-truncated unshared pair in another.
    batch = collate(tokenizer, examples[1:], max_row_tokens=2 * MAX_LENGTH)
    assert batch[PACKED_KEY]["input_ids"].size(0) > 1 and 0 < shared_pairs(batch) < 3
    # Random per-token weights: a token scored at the wrong place, or twice, changes the gradient.
    weights = torch.rand(
        batch["input_ids"].size(0), batch["input_ids"].size(1) - 1, generator=torch.Generator().manual_seed(0)
    )
    (weights * reference_log_probs(reference, batch)).sum().backward()
    (weights * packed_outputs(packed, batch).log_probs).sum().backward()
    assert_grads_match(packed, reference)


def assert_grads_match(actual_model, expected_model) -> None:
    expected = {name: p.grad for name, p in expected_model.named_parameters() if p.grad is not None}
    actual = {name: p.grad for name, p in actual_model.named_parameters() if p.grad is not None}
    assert expected and expected.keys() == actual.keys()
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, f"{name}: zero reference gradient"
        diff = relative_difference(actual[name], grad)
        assert diff <= RELATIVE_TOLERANCE, f"gradient of {name} differs by {diff:.2e} relative"


def test_gradient_checkpointing_sees_the_same_layout(tokenizer, examples, monkeypatch):
    reference, packed = model_pair("llama", len(tokenizer))
    reference.train()
    packed.train()
    batch = collate(tokenizer, examples[:3])
    weights = torch.rand(
        batch["input_ids"].size(0), batch["input_ids"].size(1) - 1, generator=torch.Generator().manual_seed(1)
    )
    (weights * reference_log_probs(reference, batch)).sum().backward()
    (weights * packed_outputs(packed, batch).log_probs).sum().backward()
    plain = {name: p.grad.clone() for name, p in packed.named_parameters()}
    packed.zero_grad(set_to_none=True)

    calls = []
    original = sdpa_packed.packed_sdpa_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "packed_sdpa_attention", spy)
    packed.gradient_checkpointing_enable()
    assert packed.is_gradient_checkpointing
    (weights * packed_outputs(packed, batch).log_probs).sum().backward()
    # The recomputation in backward ran the packed attention again, with the layout (not plain causal attention).
    assert len(calls) == 2 * packed.config.num_hidden_layers
    for name, grad in plain.items():
        diff = relative_difference(packed.get_parameter(name).grad, grad)
        assert diff <= RELATIVE_TOLERANCE, f"gradient of {name} differs by {diff:.2e} with checkpointing"
    assert_grads_match(packed, reference)


# -- the plain path on a switched model -----------------------------------------------------------------------------


def test_plain_batches_and_generate_unchanged_on_switched_model(tokenizer, examples):
    case = "mistral"  # its sliding-window mask goes through the registered mask function too
    reference, packed = model_pair(case, len(tokenizer))
    packed.eval()
    batch = collate(tokenizer, examples[:3], max_length=64)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        actual = packed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert relative_difference(actual[mask], expected[mask]) <= RELATIVE_TOLERANCE
        # TRL's own fused call without a layout (the trainer's probe, or a plain collator) is the stock forward.
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        fused = packed(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True
        )
        assert_log_probs_match(fused.log_probs, cached_reference_log_probs(case, reference, batch), batch)

    # Left-padded generation: a dropped padding mask would change the logits of the shorter prompts.
    prompts = [ex["prompt_ids"][-20:] for ex in examples[:2]] + [examples[3]["prompt_ids"][-7:]]
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        want = reference.generate(**kwargs)
        got = packed.generate(**kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, e in zip(got.logits, want.logits, strict=True):
        assert relative_difference(a, e) <= RELATIVE_TOLERANCE
    # And generation agrees with running each prompt alone, unpadded (so the padding mask really was applied).
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            alone = reference(input_ids=torch.tensor([prompt])).logits[0, -1]
            assert relative_difference(got.logits[0][row], alone) <= RELATIVE_TOLERANCE


# -- unsupported architectures --------------------------------------------------------------------------------------


def test_softcap_applied_outside_the_attention_call_is_refused_at_enable_time():
    """Soft-capping is served when the layer passes `softcap` to the attention function (Gemma 2 does); a layer that
    applies it some other way would have it dropped by the packed kernels, so the structural check refuses it."""
    config = AutoConfig.for_model(
        "llama",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config.attn_logit_softcapping = 5.0  # Llama's attention never passes `softcap`
    model = AutoModelForCausalLM.from_config(config)
    add_fused_lm_head(model)
    with pytest.raises(UnsupportedModelError, match="without passing `softcap`"):
        enable_prefix_sharing(model, "sdpa")
    assert model.config._attn_implementation != attention.ATTENTION_NAME


# -- layout reuse and no dense mask ---------------------------------------------------------------------------------


def test_layout_is_built_once_per_batch(tokenizer, examples, monkeypatch):
    batch = collate(tokenizer, examples)
    first = layout_for_batch(batch[PACKED_KEY], "sdpa")
    assert layout_for_batch(batch[PACKED_KEY], "sdpa") is first
    assert layout_for_batch(collate(tokenizer, examples)[PACKED_KEY], "sdpa") is not first

    # Policy and reference forwards of one step: one layout, and each bucket mask built once for both.
    policy, reference_model = model_pair("llama", len(tokenizer))[1], model_pair("llama", len(tokenizer))[1]
    batch = collate(tokenizer, examples)
    built, masks = [], []
    init = packed_layout.PackedAttentionLayout.__init__
    bucket_mask = sdpa_packed.bucket_mask

    def counting_init(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    def counting_mask(*args, **kwargs):
        masks.append(1)
        return bucket_mask(*args, **kwargs)

    monkeypatch.setattr(packed_layout.PackedAttentionLayout, "__init__", counting_init)
    monkeypatch.setattr(sdpa_packed, "bucket_mask", counting_mask)
    with torch.no_grad():
        first = packed_outputs(policy, batch).log_probs
        second = packed_outputs(reference_model, batch).log_probs
    assert torch.equal(first, second)
    assert len(built) == 1
    assert len(masks) == len(batch[PACKED_KEY]["attention_buckets"]) > 0


def test_packed_forward_builds_no_dense_mask(tokenizer, examples, monkeypatch):
    _, packed = model_pair("qwen3-mixed", len(tokenizer))  # sliding and full layers: both kinds of bucket mask
    batch = collate(tokenizer, examples)
    mask_calls = []
    original_mask = masking_utils.sdpa_mask

    def counting_mask(*args, **kwargs):
        mask_calls.append(1)
        return original_mask(*args, **kwargs)

    monkeypatch.setattr(masking_utils, "sdpa_mask", counting_mask)
    monkeypatch.setattr(attention, "sdpa_mask", counting_mask)
    sdpa_calls = []
    original_sdpa = F.scaled_dot_product_attention

    def spy_sdpa(query, key, value, attn_mask=None, **kwargs):
        mask_shape = None if attn_mask is None else tuple(attn_mask.shape)
        sdpa_calls.append((key.shape[-2], mask_shape, kwargs.get("is_causal", False)))
        return original_sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
    row_length = batch[PACKED_KEY]["input_ids"].size(1)
    with torch.no_grad():
        packed_outputs(packed, batch)
    assert mask_calls == []
    assert sdpa_calls, "the SDPA spy saw no call: the check would be vacuous"
    for key_length, mask_shape, is_causal in sdpa_calls:
        # Each call covers one group's keys (a document's prompt and one branch), never a whole row.
        assert key_length < row_length, f"an SDPA call over {key_length} keys spans the row of {row_length}"
        assert is_causal or (mask_shape is not None and mask_shape[-1] == key_length)
    # Positive control: the same counters fire on a plain padded batch of the same switched model.
    sdpa_calls.clear()
    with torch.no_grad():
        packed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert mask_calls and sdpa_calls
