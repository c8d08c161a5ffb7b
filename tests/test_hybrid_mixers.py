"""Hybrid models (short convolutions, Mamba2 scans, gated delta rules next to attention) against stock TRL.

In a packed row every document's mixer state must start at zero and every branch must continue from the state at the
end of its shared prefix (`core/mixers`). The stock trainers run each sequence in its own padded row, so equal losses,
gradients (through the prefix's state into both branches) and metrics show both. The Mamba2 chunk size is set below
the sequence lengths, so a branch's scan starts mid-chunk from a handed-in state; the gated delta rule's fixed chunk
(64) is crossed by these sequences too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import load_dataset_rows, save_tiny_model
from datasets import Dataset
from equivalence import (
    EQUIVALENCE_DTYPE,
    RELATIVE_TOLERANCE,
    assert_equivalent,
    first_batch,
    perturb,
    relative_difference,
    tree_depth,
)
from test_model_registry import FAMILY_FIELDS
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.kimi_linear import modeling_kimi_linear
from transformers.models.lfm2 import modeling_lfm2

from trl_prefix_share.core.mixers import ragged, ragged_kernels, segmented
from trl_prefix_share.core.mixers.kinds import left_padding_keeps_zero_state, mixer_verdict
from trl_prefix_share.core.mixers.ragged_plan import build_ragged_plan
from trl_prefix_share.core.mixers.segments import build_segments
from trl_prefix_share.core.model_structure import inspect_model
from trl_prefix_share.core.packing import PACKED_KEY

#: transformers >= 5.25's shared convolution helper (a planted forward below calls it as a global, as the models do).
causal_conv1d_forward = getattr(modeling_lfm2, "causal_conv1d_forward", None)

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
GATED_DELTA = dict(
    layer_types=["linear_attention", "full_attention"],
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16)
#: One mixer layer and one attention layer per family: Qwen3.5 / Qwen3-Next gated delta rule, Nemotron-H / Granite 4
#: hybrid / Falcon-H1 Mamba2, LFM2 short convolution, Kimi-Linear's Kimi delta attention.
FAMILIES = {
    "lfm2": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]),
    # Biased projections: zeroed left padding would not keep the state at zero, so prefixes run grouped by length.
    "lfm2_biased": dict(model_type="lfm2", num_hidden_layers=2, layer_types=["conv", "full_attention"], conv_bias=True),
    "qwen3_5_text": dict(num_hidden_layers=2, **GATED_DELTA),
    "qwen3_next": dict(
        num_hidden_layers=2,
        **GATED_DELTA,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    ),
    "nemotron_h": dict(
        layers_block_type=["mamba", "attention"],
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=8,
        n_groups=1,
        chunk_size=16,
    ),
    # `num_experts` too: TRL's fused head reads that name for the router's aux loss of every MoE.
    "granitemoehybrid": dict(
        num_hidden_layers=2,
        layer_types=["mamba", "attention"],
        **MAMBA2,
        num_local_experts=4,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "falcon_h1": dict(num_hidden_layers=2, mamba_d_ssm=64, **MAMBA2),
    # Kimi delta attention next to MLA attention, with MoE layers (the registry's small fields).
    "kimi_linear": dict(FAMILY_FIELDS["kimi_linear"], num_hidden_layers=2, moe_intermediate_size=32),
}
#: The mixer kind each family must be served with (read from its code by `core/mixers/kinds.py`).
KINDS = {
    "lfm2": "short_conv",
    "lfm2_biased": "short_conv",
    "qwen3_5_text": "gated_delta",
    "qwen3_next": "gated_delta",
    "nemotron_h": "mamba2",
    "granitemoehybrid": "mamba2",
    "falcon_h1": "mamba2",
    "kimi_linear": "kimi_delta",
}
#: transformers' gated delta rule and Mamba2 scan compute in float32 whatever the model's dtype (`.float()` inside the
#: kernels), and the packed run chunks each sequence differently (the prefix, then each branch from its state), so
#: those families carry float32 rounding that stock's single chunking does not. It shows on the decay parameters
#: (`A_log`, `dt_bias`), whose gradients are ~1e-6 of the largest and come out of the float32 scan alone: Qwen3-Next's
#: `dt_bias` gradient differs by 1.45e-2 of its own size (3e-8 of the largest gradient), and by 3e-8 when the kernel
#: runs in float64 (test_the_float32_kernel_is_the_whole_difference). Gradients below GRADIENT_FLOOR x the largest
#: are therefore compared against that floor; everything else holds 1e-5 of its own size, and a branch started from a
#: zero state instead of its prefix's moves the loss by > 1e-2 (test_a_lost_state_or_boundary_is_caught).
GRADIENT_FLOOR = 1e-2


def compare(stock, ours, stock_batch, our_batch) -> None:
    assert_equivalent(stock, ours, stock_batch, our_batch, gradient_floor=GRADIENT_FLOOR)


def family_saver(tmp_path_factory, tokenizer):
    """Factory: path of a saved tiny float64 causal LM of a hybrid family (each saved once)."""
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            fields = dict(FAMILIES[family])
            model_type = fields.pop("model_type", family)
            cache[family] = save_tiny_model(
                tmp_path_factory.mktemp(family), tokenizer, model_type, **{**SMALL, **fields}
            )
        return cache[family]

    return get


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    return family_saver(tmp_path_factory, tokenizer)


@pytest.fixture(scope="module")
def hh_rows():
    return load_dataset_rows("hh_harmless", 8)


@pytest.fixture(scope="module")
def shared_prompt_rows():
    """Three pairs of one prompt and one pair of another: with grouping, a document of six branches (K > 2)."""
    rows = load_dataset_rows("ultrafeedback", 4).to_list()
    for row in rows[1:3]:
        row["prompt"] = rows[0]["prompt"]
    return Dataset.from_list(rows)


def dpo_pair(saved, family, tokenizer, rows, **config):
    from test_dpo_equivalence import dpo_args, make_pair

    from trl_prefix_share import PrefixSharedDPOConfig

    def args_factory():
        return dpo_args(PrefixSharedDPOConfig, **config) if config else dpo_args()

    stock, ours = make_pair(saved(family), tokenizer, rows, args_factory=args_factory)
    assert ours.prefix_share_fallback is None, ours.prefix_share_fallback
    return stock, ours


#: Families whose mixers run on the packed tokens without padding (`core/mixers/ragged.py`); the others run padded
#: batches of segments.
#: Mamba2 mixers call the scan helper that takes the mixer (`mamba2_scan_forward`) from transformers 5.25 on, the
#: release that also brought the shared convolution helper; before, they scan inline and stay on the padded run.
MAMBA2_UNPADDED = causal_conv1d_forward is not None
#: Kimi delta attention (a decay per key channel) takes the unpadded run on the tested releases (5.24 calls the
#: convolution kernel inline, 5.25 the shared helper); read from the installed release, pinned on 5.25's below.
KIMI_UNPADDED = isinstance(ragged.ragged_recipe(modeling_kimi_linear.KimiLinearDeltaAttention), ragged.RaggedRecipe)
RAGGED = (
    {"lfm2", "lfm2_biased", "qwen3_5_text", "qwen3_next"}
    | ({"nemotron_h", "granitemoehybrid", "falcon_h1"} if MAMBA2_UNPADDED else set())
    | ({"kimi_linear"} if KIMI_UNPADDED else set())
)


def count_runs(monkeypatch) -> dict[str, int]:
    """How often each mixer run (ragged, padded) is taken from now on."""
    counts = {"run_ragged": 0, "run_segmented": 0}
    for name in counts:
        original = getattr(segmented, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(segmented, name, counted)
    return counts


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_matches_stock(family, saved, tokenizer, hh_rows, monkeypatch):
    """Convolution, gated-delta and Mamba2 mixers on the packed tokens (no padding, prefix trees on hh's short
    template heads: a minimum of 2 shared tokens, so the batch is one tree of depth 2 or more), Kimi delta attention
    too; mixers on the padded run (one-level layouts): prefixes of several lengths left-padded
    (bias-free mixers) or grouped by length (biased ones)."""
    stock, ours = dpo_pair(saved, family, tokenizer, hh_rows, prefix_tree_min_shared_tokens=2)
    assert ours.prefix_share_packing.prefix_tree == (family in RAGGED)  # trees need the unpadded run
    runs = count_runs(monkeypatch)
    mixers = [(m, v) for m, v in ((m, mixer_verdict(m)) for m in ours.model.modules()) if v is not None]
    assert {verdict.kind for _, verdict in mixers} == {KINDS[family]}
    left_padded = {left_padding_keeps_zero_state(module, verdict) for module, verdict in mixers}
    assert left_padded == {family != "lfm2_biased"}
    stock_batch, our_batch = first_batch(stock, 4), first_batch(ours, 4)
    packed = our_batch[PACKED_KEY]
    assert (tree_depth(packed) >= 2) == (family in RAGGED)
    assert packed["input_ids"].size(0) < stock_batch["input_ids"].size(0)  # several documents per row
    assert packed["input_ids"].numel() < stock_batch["input_ids"].numel()
    compare(stock, ours, stock_batch, our_batch)
    ragged, padded = runs["run_ragged"], runs["run_segmented"]
    assert (ragged > 0, padded > 0) == ((True, False) if family in RAGGED else (False, True)), runs


def test_k_branches_per_prompt_match_stock(saved, tokenizer, shared_prompt_rows, monkeypatch):
    """Qwen3.5: three pairs of one prompt packed as one document of six branches, each from the prefix's state; the
    kernel in float64 (see test_the_float32_kernel_is_the_whole_difference), so every gradient holds 1e-5."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5

    run_kernel_in_float64(monkeypatch, qwen3_5)
    stock, ours = dpo_pair(saved, "qwen3_5_text", tokenizer, shared_prompt_rows, group_by_prompt=True)
    stock_batch, our_batch = first_batch(stock, 4), first_batch(ours, 4)
    branch_ids = our_batch[PACKED_KEY]["branch_ids"]
    document_ids = our_batch[PACKED_KEY]["document_ids"]
    assert int(branch_ids[document_ids == document_ids[0, 0]].max()) == 6
    assert_equivalent(stock, ours, stock_batch, our_batch)


def test_a_prefix_tree_matches_stock(saved, tokenizer, monkeypatch):
    """Qwen3.5: three pairs behind one system prompt, one tree three levels deep (system prompt, prompts, responses),
    each node's convolution and scan from its parent's state on the unpadded run; the kernel in float64."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5
    from test_prefix_trees import assert_one_deep_tree, system_rows

    run_kernel_in_float64(monkeypatch, qwen3_5)
    stock, ours = dpo_pair(saved, "qwen3_5_text", tokenizer, system_rows(3))
    runs = count_runs(monkeypatch)
    stock_batch, our_batch = first_batch(stock, 3), first_batch(ours, 3)
    assert_one_deep_tree(our_batch[PACKED_KEY], 3)
    compare(stock, ours, stock_batch, our_batch)
    assert runs["run_ragged"] > 0 and runs["run_segmented"] == 0


@pytest.mark.parametrize(
    ("family", "run"),
    [
        ("nemotron_h", "run_ragged" if MAMBA2_UNPADDED else "run_segmented"),
        ("kimi_linear", "run_ragged" if KIMI_UNPADDED else "run_segmented"),
    ],
)
def test_gradient_checkpointing_recomputes_the_segmented_mixers(family, run, saved, tokenizer, hh_rows, monkeypatch):
    """The layout reaches each mixer through the layer's keyword arguments, which checkpointing replays (the ragged
    run's forward copy included)."""
    stock, ours = dpo_pair(saved, family, tokenizer, hh_rows)
    for trainer in (stock, ours):
        trainer.model.gradient_checkpointing_enable()  # what `train()` does with `gradient_checkpointing=True`
    runs = count_runs(monkeypatch)
    assert_equivalent(stock, ours, first_batch(stock, 4), first_batch(ours, 4))
    assert runs[run] == 3  # the policy forward, the reference forward, and the policy's recomputation


def one_level_span_ends(document_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """Subtree ends of a hand-written one-level layout: a prefix (branch 0) spans its document, a branch itself."""
    span = torch.full_like(document_ids, -1)
    for row in range(document_ids.size(0)):
        for index in range(document_ids.size(1)):
            doc, branch = int(document_ids[row, index]), int(branch_ids[row, index])
            if doc < 0:
                continue
            same = (
                (document_ids[row] == doc) if branch == 0 else (document_ids[row] == doc) & (branch_ids[row] == branch)
            )
            span[row, index] = int(same.nonzero().max()) + 1
    return span


def without_prefix_state(document_ids, branch_ids, span_ends, left_padded):
    """Padded run, planted fault: every branch starts from a zero state."""
    segments = build_segments(document_ids, branch_ids, span_ends, left_padded)
    return dataclasses.replace(segments, branch_parent=torch.zeros_like(segments.branch_parent))


def ragged_without_prefix_state(document_ids, branch_ids, span_ends):
    """Ragged run, planted fault: every branch starts from a zero state (its prefix's state not handed over)."""
    plan = build_ragged_plan(document_ids, branch_ids, span_ends)
    return dataclasses.replace(plan, parents=torch.full_like(plan.parents, -1), _built={})


def ragged_without_boundaries(document_ids, branch_ids, span_ends):
    """Ragged run, planted fault: the boundaries are not passed, so each packed row is one sequence and every
    document's state leaks into the next one's."""
    real = (document_ids >= 0).long()
    one_run = torch.where(real == 1, real.sum(dim=1, keepdim=True), -1)
    return build_ragged_plan(real - 1, torch.zeros_like(branch_ids).masked_fill(real == 0, -1), one_run)


def force_padded_run(monkeypatch) -> None:
    """Keep every mixer on the padded run (as a forward the unpadded run cannot read would be)."""
    monkeypatch.setattr(ragged, "ragged_recipe", lambda cls: f"{cls.__name__}: kept on the padded run (test)")


@pytest.mark.parametrize("family", ["kimi_linear", "qwen3_5_text"])
def test_the_padded_run_matches_stock(family, saved, tokenizer, hh_rows, monkeypatch):
    """The padded run, which serves any mixer the unpadded run cannot read, on a per-channel (Kimi) and a per-head
    (gated delta) decay: stock's loss, gradients and metrics, and no tree layouts."""
    force_padded_run(monkeypatch)
    stock, ours = dpo_pair(saved, family, tokenizer, hh_rows)
    assert not ours.prefix_share_packing.prefix_tree
    runs = count_runs(monkeypatch)
    compare(stock, ours, first_batch(stock, 4), first_batch(ours, 4))
    assert runs["run_segmented"] > 0 and runs["run_ragged"] == 0


def slow_decay(model: torch.nn.Module) -> None:
    """Mamba2 mixers with a decay rate near zero (``A = -exp(-4)``): a leaked state then lasts through a whole prompt
    instead of fading within tens of tokens, so the planted faults show in the loss."""
    for module in model.modules():
        if isinstance(getattr(module, "A_log", None), torch.nn.Parameter):
            module.A_log.data.fill_(-4.0)


@pytest.mark.parametrize(
    ("family", "target", "faults", "least"),
    [
        ("kimi_linear", "build_segments", [without_prefix_state], 1e-2),
        pytest.param(
            "kimi_linear",
            "build_ragged_plan",
            [ragged_without_prefix_state, ragged_without_boundaries],
            1e-2,
            marks=pytest.mark.skipif(not KIMI_UNPADDED, reason="Kimi delta takes the padded run on this release"),
        ),
        ("qwen3_5_text", "build_ragged_plan", [ragged_without_prefix_state, ragged_without_boundaries], 1e-2),
        pytest.param(
            "nemotron_h",
            "build_ragged_plan",
            [ragged_without_prefix_state],
            1e-2,
            marks=pytest.mark.skipif(not MAMBA2_UNPADDED, reason="Mamba2 takes the padded run before 5.25"),
        ),
        pytest.param(
            "nemotron_h",
            "build_ragged_plan",
            [ragged_without_boundaries],
            50 * RELATIVE_TOLERANCE,
            marks=pytest.mark.skipif(not MAMBA2_UNPADDED, reason="Mamba2 takes the padded run before 5.25"),
        ),
        ("lfm2", "build_ragged_plan", [ragged_without_boundaries], 100 * RELATIVE_TOLERANCE),
    ],
    ids=[
        "padded-kimi-delta",
        "ragged-kimi-delta",
        "ragged-gated-delta",
        "ragged-mamba2-state",
        "ragged-mamba2-boundaries",
        "ragged-convolution",
    ],
)
def test_a_lost_state_or_boundary_is_caught(family, target, faults, least, saved, tokenizer, hh_rows, monkeypatch):
    """The comparison can fail: branches that start from a zero state, or documents whose state leaks into the next
    (the known trap of variable-length kernels), move the loss by more than ``least``: 1e-2 for a lost recurrent
    state; a short convolution's leak reaches only its kernel's first tokens after a boundary (2e-3 of the loss
    measured, so 100x the tolerance is asked). Mamba2's decaying state fades within a prompt, so its mixers get a
    near-zero decay rate here (`slow_decay`, stock and ours alike); a leak across documents then moves the loss by
    1.3e-3 (50x the tolerance asked), a branch that loses its prefix's state by > 1e-2."""
    from equivalence import loss_and_grads

    if target == "build_segments":
        force_padded_run(monkeypatch)
    stock, ours = dpo_pair(saved, family, tokenizer, hh_rows)
    for trainer in (stock, ours) if KINDS[family] == "mamba2" else ():
        slow_decay(trainer.model)  # both policies alike (their reference models keep the saved weights)
    stock_batch = first_batch(stock, 4)
    expected, _, _ = loss_and_grads(stock, stock_batch)
    assert relative_difference(loss_and_grads(ours, first_batch(ours, 4))[0], expected) <= RELATIVE_TOLERANCE
    for fault in faults:
        with monkeypatch.context() as patch:
            patch.setattr(segmented, target, fault)
            runs = count_runs(patch)
            broken, _, _ = loss_and_grads(ours, first_batch(ours, 4))  # a new batch: a new layout, built faulty
        assert runs["run_ragged" if target == "build_ragged_plan" else "run_segmented"] > 0, fault.__name__
        assert relative_difference(broken, expected) > least, fault.__name__


def test_mixer_kinds_are_read_from_their_code():
    """Served kinds by the kernel their forward calls with the cached state; Mamba1 scans, which transformers' torch
    path cannot start from a cached state, are refused with that reason; plain modules are not mixers."""
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer
    from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv
    from transformers.models.mamba.modeling_mamba import MambaMixer
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    from trl_prefix_share.core.mixers.kinds import _classify

    assert _classify(Lfm2ShortConv).kind == "short_conv"
    assert _classify(Qwen3NextGatedDeltaNet).kind == "gated_delta"
    for mamba1 in (MambaMixer, JambaMambaMixer):
        verdict = _classify(mamba1)
        assert not verdict.served and "does not start its multi-token scan from a cached state" in verdict.reason
    assert _classify(torch.nn.Linear) is None

    class StateButNoCache(torch.nn.Module):
        def forward(self, hidden_states, state=None):
            return state.get_recurrent_state(0) + hidden_states

    assert "takes no `cache`" in _classify(StateButNoCache).reason


def test_the_unpadded_run_is_read_from_the_forward():
    """Convolution, gated-delta and Mamba2 forwards of the tested releases take the unpadded run (Mamba2's fused
    kernel call answered None), Kimi delta attention too (its forget gate read as per-token code); a forward with a
    call that mixes along time, or an
    instance whose projection was swapped for a convolution, stays on the padded run with the reason named."""
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1Mixer
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention
    from transformers.models.lfm2.configuration_lfm2 import Lfm2Config
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    from trl_prefix_share.core.mixers.ragged import RaggedRecipe, instance_recipe, ragged_recipe

    for served in (Qwen3_5GatedDeltaNet, Qwen3NextGatedDeltaNet, modeling_lfm2.Lfm2ShortConv):
        recipe = ragged_recipe(served)
        assert isinstance(recipe, RaggedRecipe), recipe
        assert recipe.scan_kernel is None if served is modeling_lfm2.Lfm2ShortConv else recipe.scan_kernel
    for mamba2 in (NemotronHMamba2Mixer, FalconH1Mixer) if MAMBA2_UNPADDED else ():
        recipe = ragged_recipe(mamba2)
        assert isinstance(recipe, RaggedRecipe), recipe
        assert recipe.scan_kernel == "mamba2_scan_forward"
        assert recipe.fused == ("mamba2_split_conv1d_scan_combined",)  # answered None: the torch path runs
    if causal_conv1d_forward is not None:  # 5.25 on: the convolution helper, as the others call it
        kimi = ragged_recipe(KimiLinearDeltaAttention)
        assert isinstance(kimi, RaggedRecipe) and kimi.scan_kernel == "chunk_kimi_delta_attention", kimi
        assert "forget_gate" in kimi.submodules and kimi.refused == ("recurrent_kimi_delta_attention",)
        config = AutoConfig.for_model("kimi_linear", **{**SMALL, **FAMILIES["kimi_linear"]})
        mixer = KimiLinearDeltaAttention(config, 0)
        assert isinstance(instance_recipe(mixer, mixer.forward), RaggedRecipe)  # its own gate read as per-token code

        class RunningGate(type(mixer.forget_gate)):
            def forward(self, hidden_states):
                return super().forward(hidden_states).cumsum(1)  # mixes along time

        mixer.forget_gate = RunningGate(config)
        assert instance_recipe(mixer, mixer.forward) == "KimiLinearDeltaAttention.forget_gate is not a per-token layer"

    if causal_conv1d_forward is not None:  # transformers >= 5.25: the convolution helper that takes the module

        class RunningSum(modeling_lfm2.Lfm2ShortConv):
            def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
                x = self.in_proj(hidden_states).transpose(-1, -2)[:, : self.conv.in_channels]
                x = causal_conv1d_forward(self.conv, x, cache, self.layer_idx)
                return self.out_proj(x.cumsum(-1).transpose(-1, -2))  # mixes along time outside the convolution

        assert ragged_recipe(RunningSum) == "RunningSum calls `cumsum`"

        class PooledGate(modeling_lfm2.Lfm2ShortConv):
            def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
                x = self.in_proj(hidden_states).transpose(-1, -2)[:, : self.conv.in_channels]
                x = causal_conv1d_forward(self.conv, x, cache, self.layer_idx)
                gate = x.max(dim=-1, keepdim=True).values  # `max` pools over time: across documents
                return self.out_proj((x * gate).transpose(-1, -2))

        assert ragged_recipe(PooledGate) == "PooledGate calls `max`"
    layer = modeling_lfm2.Lfm2ShortConv(Lfm2Config(hidden_size=32, num_hidden_layers=2), 0)
    assert isinstance(instance_recipe(layer, layer.forward), RaggedRecipe)
    layer.out_proj = torch.nn.Conv1d(32, 32, 3)
    assert instance_recipe(layer, layer.forward) == "Lfm2ShortConv.out_proj is not a per-token layer"
    for pooling in (torch.nn.BatchNorm1d(32), torch.nn.InstanceNorm1d(32), torch.nn.GroupNorm(4, 32)):
        layer.out_proj = pooling  # "Norm" by name, but its statistics run over tokens
        assert instance_recipe(layer, layer.forward) == "Lfm2ShortConv.out_proj is not a per-token layer"


def check_ragged_kernels_per_segment(plan, document_ids: torch.Tensor) -> None:
    """Both ragged kernels over ``plan`` against transformers' torch kernel (float64) run on each segment alone from
    its parent's final state, its convolution history the last inputs of its chain of ancestors."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5

    generator = torch.Generator().manual_seed(0)
    tokens, channels, kernel = document_ids.numel(), 6, 4

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    query, key, value = randn(1, tokens, 2, 8), randn(1, tokens, 2, 8), randn(1, tokens, 4, 8)
    decay, beta = -torch.rand(1, tokens, 4, generator=generator).double(), torch.rand(1, tokens, 4).double()
    inputs, weight, bias = randn(1, channels, tokens), randn(channels, 1, kernel), randn(channels)
    scanned = ragged_kernels.ragged_gated_delta_rule(
        query, key, value, decay, beta, plan.chunk_schedule(torch.device("cpu")), use_qk_l2norm=True
    )
    convolved = ragged_kernels.ragged_causal_conv(
        inputs, weight, bias, "silu", plan.conv_gather(kernel, torch.device("cpu"))
    )
    check_delta_rule_per_segment(plan, scanned, qwen3_5.torch_chunk_gated_delta_rule, query, key, value, decay, beta)
    paths = {}
    for segment, (start, length, parent) in enumerate(zip(plan.starts, plan.lengths, plan.parents, strict=True)):
        run, parent = slice(int(start), int(start + length)), int(parent)
        paths[segment] = (paths[parent] if parent >= 0 else []) + list(range(int(start), int(start + length)))
        history = torch.zeros(1, channels, kernel - 1, dtype=torch.float64)
        if parent >= 0:
            tail = inputs[..., paths[parent]][..., -(kernel - 1) :]
            history[..., kernel - 1 - tail.size(-1) :] = tail
        own = torch.cat([history, inputs[..., run]], dim=-1)
        expected_conv = torch.nn.functional.silu(torch.nn.functional.conv1d(own, weight, bias, groups=channels))
        torch.testing.assert_close(convolved[..., run], expected_conv, rtol=1e-12, atol=1e-12)
    padding = document_ids.reshape(-1) < 0
    if bool(padding.any()):
        assert scanned[0, padding].abs().max() == 0 and convolved[0, :, padding].abs().max() == 0
    check_ragged_mamba2_per_segment(plan, padding, randn)
    check_ragged_kimi_per_segment(plan, padding, randn)


def check_ragged_kimi_per_segment(plan, padding: torch.Tensor, randn) -> None:
    """The ragged Kimi delta rule (a log decay per key channel) over ``plan`` against Kimi-Linear's own torch kernel
    (float64) run on each segment alone from its parent's final state; padding gets zeros."""
    tokens, heads, d_k, d_v = plan.num_tokens, 2, 8, 6
    query, key, value = randn(1, tokens, heads, d_k), randn(1, tokens, heads, d_k), randn(1, tokens, heads, d_v)
    decay = -torch.rand(1, tokens, heads, d_k, dtype=torch.float64)  # per channel, as its forget gate gives
    beta = torch.rand(1, tokens, heads, dtype=torch.float64)
    schedule = plan.chunk_schedule(torch.device("cpu"))
    scanned = ragged_kernels.ragged_gated_delta_rule(query, key, value, decay, beta, schedule, use_qk_l2norm=True)
    budget = ragged_kernels.CHANNEL_PAIR_BUDGET
    ragged_kernels.CHANNEL_PAIR_BUDGET = 1  # the per-channel pair decays one chunk at a time: the same result
    try:
        sliced = ragged_kernels.ragged_gated_delta_rule(query, key, value, decay, beta, schedule, use_qk_l2norm=True)
    finally:
        ragged_kernels.CHANNEL_PAIR_BUDGET = budget
    torch.testing.assert_close(sliced, scanned, rtol=1e-13, atol=1e-13)
    reference = modeling_kimi_linear.chunk_kimi_delta_attention
    check_delta_rule_per_segment(plan, scanned, reference, query, key, value, decay, beta)
    if bool(padding.any()):
        assert scanned[0, padding].abs().max() == 0


def check_delta_rule_per_segment(plan, scanned, reference, query, key, value, decay, beta) -> None:
    """``scanned`` (a ragged delta rule over ``plan``) equals ``reference`` (transformers' kernel) run on each segment
    alone from its parent's final state."""
    final_states = {}
    for segment, (start, length, parent) in enumerate(zip(plan.starts, plan.lengths, plan.parents, strict=True)):
        run, parent = slice(int(start), int(start + length)), int(parent)
        expected, final_states[segment] = reference(
            *(x[:, run] for x in (query, key, value)),
            g=decay[:, run],
            beta=beta[:, run],
            initial_state=final_states.get(parent),
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )
        torch.testing.assert_close(scanned[:, run], expected, rtol=1e-12, atol=1e-12)


def check_ragged_mamba2_per_segment(plan, padding: torch.Tensor, randn) -> None:
    """The ragged Mamba2 scan over ``plan`` against transformers' torch kernel (float64; its own chunk size, 16, not
    the ragged run's 64) run on each segment alone from its parent's final state; padding gets the skip term only."""
    import transformers.models.mamba2.modeling_mamba2 as mamba2

    tokens, heads, groups, head_dim, state, limit = plan.num_tokens, 4, 2, 8, 6, (0.0, 2.0)
    hidden, dt = randn(1, tokens, heads, head_dim), randn(1, tokens, heads)
    B, C = randn(1, tokens, groups, state), randn(1, tokens, groups, state)
    A, D, dt_bias = -(torch.rand(heads, dtype=torch.float64) + 0.1), randn(heads), randn(heads)
    schedule = plan.chunk_schedule(torch.device("cpu"))
    scanned = ragged_kernels.ragged_mamba2_scan(hidden, dt, A, B, C, D, dt_bias, limit, schedule)
    final_states = {}
    for segment, (start, length, parent) in enumerate(zip(plan.starts, plan.lengths, plan.parents, strict=True)):
        run, parent = slice(int(start), int(start + length)), int(parent)
        expected, final_states[segment] = mamba2.mamba2_chunk_scan(
            hidden[:, run],
            dt[:, run],
            A,
            B[:, run],
            C[:, run],
            chunk_size=16,
            D=D,
            dt_bias=dt_bias,
            initial_states=final_states.get(parent),
            dt_softplus=True,
            dt_limit=limit,
            return_final_states=True,
        )
        torch.testing.assert_close(scanned[:, run], expected, rtol=1e-12, atol=1e-12)
    if bool(padding.any()):
        torch.testing.assert_close(scanned[0, padding], D[:, None] * hidden[0, padding], rtol=0, atol=0)


def test_ragged_kernels_match_transformers_per_segment(monkeypatch):
    """The ragged convolution, gated and Kimi delta rules and Mamba2 scan over packed segments equal transformers' own
    torch kernels (their source, in float64) run on each segment alone from its prefix's state: prefixes longer than one
    chunk, a prefix shorter than the convolution's history, an unshared document, row padding."""
    import transformers.models.mamba2.modeling_mamba2 as mamba2
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5

    monkeypatch.setattr(ragged_kernels, "COMPUTE_DTYPE", torch.float64)
    run_kernel_in_float64(monkeypatch, qwen3_5)
    run_kernel_in_float64(monkeypatch, mamba2, "mamba2_chunk_scan")
    run_kernel_in_float64(monkeypatch, modeling_kimi_linear, "chunk_kimi_delta_attention")
    # row 0: prefix 70 + branches 5, 130; an unshared document of 3. row 1: prefix 2 + branch 66, then padding.
    document_ids = torch.full((2, 208), -1)
    branch_ids = torch.full((2, 208), -1)
    document_ids[0], document_ids[0, 205:] = 0, 1
    branch_ids[0, :70], branch_ids[0, 70:75], branch_ids[0, 75:205], branch_ids[0, 205:] = 0, 1, 2, 1
    document_ids[1, :68], branch_ids[1, :2], branch_ids[1, 2:68] = 2, 0, 1
    plan = build_ragged_plan(document_ids, branch_ids, one_level_span_ends(document_ids, branch_ids))
    assert plan.lengths.tolist() == [70, 5, 130, 3, 2, 66] and plan.parents.tolist() == [-1, 0, 0, -1, -1, 4]
    check_ragged_kernels_per_segment(plan, document_ids)


def test_ragged_kernels_take_a_prefix_tree(monkeypatch):
    """A tree three levels deep: a 70-token system prompt, prompts of 2 tokens (shorter than the convolution's
    history, which then reaches into the system prompt) and of 80 (past a chunk), then responses: every node from
    its parent's final state."""
    import transformers.models.mamba2.modeling_mamba2 as mamba2
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5

    from trl_prefix_share.core.layout import SequenceSpec, make_document, pack_documents

    monkeypatch.setattr(ragged_kernels, "COMPUTE_DTYPE", torch.float64)
    run_kernel_in_float64(monkeypatch, qwen3_5)
    run_kernel_in_float64(monkeypatch, mamba2, "mamba2_chunk_scan")
    run_kernel_in_float64(monkeypatch, modeling_kimi_linear, "chunk_kimi_delta_attention")
    generator = torch.Generator().manual_seed(3)

    def tokens(n):
        return torch.randint(5, 99, (n,), generator=generator)

    system = tokens(70)
    documents, row = [], 0
    for prompt, responses in ((2, (5, 9)), (80, (3, 70)), (2, (4,))):
        head = torch.cat([system, tokens(prompt)])
        specs = [SequenceSpec(torch.cat([head, tokens(n)]), len(head), row + i) for i, n in enumerate(responses)]
        documents.append(make_document(specs))
        row += len(responses)
    packed = pack_documents(documents, row, 260, 0, prefix_tree=True, pad_to_multiple_of=64)
    plan = build_ragged_plan(packed["document_ids"], packed["branch_ids"], packed["span_ends"])
    depths = []
    for parent in plan.parents.tolist():
        depths.append(0 if parent < 0 else depths[parent] + 1)
    assert max(depths) == 2 and plan.parents.tolist()[0] == -1
    check_ragged_kernels_per_segment(plan, packed["document_ids"])


def test_segments_of_a_packed_layout():
    """Prefixes by exact length, or left-padded in length buckets; branches right-padded in length buckets, each
    pointing at its own prefix's state (0: a document that shares nothing); row padding in no segment."""
    from trl_prefix_share.core.mixers.segments import length_buckets

    # row 0: doc 0 = prefix(3) + branches(2, 4); doc 1 = unshared branch(3); row 1: doc 2 = prefix(2) + branch(2), pad
    document_ids = torch.tensor([[0] * 9 + [1] * 3, [2] * 4 + [-1] * 8])
    branch_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 1, 1, 1], [0, 0, 1, 1] + [-1] * 8])
    span_ends = one_level_span_ends(document_ids, branch_ids)
    segments = build_segments(document_ids, branch_ids, span_ends, left_padded=False)
    left_segments = build_segments(document_ids, branch_ids, span_ends, left_padded=True)

    def real(batch):
        if batch.valid is None:
            return batch.index.tolist()
        return [row[mask].tolist() for row, mask in zip(batch.index, batch.valid, strict=True)]

    assert [real(group) for group in segments.prefix_calls] == [[[12, 13]], [[0, 1, 2]]]
    (bucket,) = left_segments.prefix_calls  # two short prefixes: one call beats a padded slot
    assert real(bucket) == [[0, 1, 2], [12, 13]] or real(bucket) == [[12, 13], [0, 1, 2]]
    assert bucket.valid[:, -1].all()  # left-padded: every prefix ends in the last slot
    branches = [
        (member, row)
        for batch in segments.branch_buckets
        for member, row in zip(batch.members, real(batch), strict=True)
    ]
    assert sorted((int(member), row) for member, row in branches) == [
        (0, [3, 4]),
        (1, [5, 6, 7, 8]),
        (2, [9, 10, 11]),
        (3, [14, 15]),
    ]
    assert segments.branch_parent.tolist() == [1, 1, 0, 2]  # prefix ids + 1, in order of the prefixes
    assert left_segments.branch_parent.tolist() == [1, 1, 0, 2]  # the ids do not depend on how prefixes run
    # Buckets trade padding for calls: near lengths share a call, far ones do not.
    assert length_buckets([10, 12, 11, 500, 510], call_cost=64) == [[0, 2, 1], [3, 4]]
    assert length_buckets([10, 500], call_cost=1000) == [[0, 1]]


def test_left_padding_is_used_only_where_it_keeps_a_zero_state():
    """Bias-free mixers and Mamba2 (which masks again after its biased convolution) share one left-padded prefix
    call; a biased projection sends the prefixes through length groups instead."""
    from transformers.models.lfm2.configuration_lfm2 import Lfm2Config
    from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    def verdict_of(module):
        return left_padding_keeps_zero_state(module, mixer_verdict(module))

    small = dict(hidden_size=32, num_hidden_layers=2, layer_types=["conv", "full_attention"])
    assert verdict_of(Lfm2ShortConv(Lfm2Config(**small), 0))
    assert not verdict_of(Lfm2ShortConv(Lfm2Config(**small, conv_bias=True), 0))
    mamba = dict(FAMILIES["nemotron_h"], hidden_size=32)
    assert verdict_of(NemotronHMamba2Mixer(NemotronHConfig(**mamba, use_conv_bias=True), 0))
    assert not verdict_of(NemotronHMamba2Mixer(NemotronHConfig(**mamba, use_bias=True), 0))


def test_every_family_here_passes_the_structural_check(saved):
    """The structural verdict of every family here: served (no reason), whatever the probe says."""
    for family in FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(saved(family))
        assert inspect_model(model).served, (family, inspect_model(model).describe())


def test_switched_hybrid_generates_like_stock(saved, tokenizer):
    """Outside a packed forward the mixers run untouched: generation with a cache and left padding is stock's."""
    from trl.trainer.utils import add_fused_lm_head

    from trl_prefix_share.core.model_support import enable_prefix_sharing

    stock = AutoModelForCausalLM.from_pretrained(saved("qwen3_5_text"), dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(saved("qwen3_5_text"), dtype=torch.float32)
    for model in (stock, ours):
        perturb(model)
        model.eval()
    add_fused_lm_head(ours)
    enable_prefix_sharing(ours, "sdpa")
    tokenizer.padding_side = "left"
    batch = tokenizer(["Hello there, how", "A longer prompt that needs no padding"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(stock.generate(**batch, **kwargs), ours.generate(**batch, **kwargs))


def run_kernel_in_float64(monkeypatch, module, name: str = "torch_chunk_gated_delta_rule") -> None:
    """Replace a transformers kernel by its own source with the float32 casts turned to float64 (test only)."""
    from trl_prefix_share.core.code_reading import function_source

    source = function_source(getattr(module, name))  # through decorators and `kernels`' wrapper modules
    assert source, f"cannot read {module.__name__}.{name}"
    source = "\n".join(line for line in source.splitlines() if not line.startswith("@"))
    namespace = dict(vars(module))
    source = source.replace("torch.float32", "torch.float64").replace(".float()", ".double()")
    exec(source, namespace)  # noqa: S102 - transformers' own source
    monkeypatch.setattr(module, name, namespace[name])
    monkeypatch.setattr(ragged_kernels, "COMPUTE_DTYPE", torch.float64)  # the ragged scan alike


def test_the_float32_kernel_is_the_whole_difference(saved, tokenizer, hh_rows, monkeypatch):
    """With transformers' gated delta rule run in float64 (its own code, the float32 casts turned to float64 here),
    every gradient of Qwen3-Next matches stock within 1e-5 of its own size, the decay parameters' included: what the
    gradient floor allows for is the kernel's float32 rounding, not the segmentation."""
    import transformers.models.qwen3_next.modeling_qwen3_next as qwen3_next

    run_kernel_in_float64(monkeypatch, qwen3_next)
    stock, ours = dpo_pair(saved, "qwen3_next", tokenizer, hh_rows)
    assert_equivalent(stock, ours, first_batch(stock, 4), first_batch(ours, 4))


# -- the other trainers ------------------------------------------------------------------------------------------------


def test_reward_model_matches_stock(saved, tokenizer, hh_rows, tmp_path, monkeypatch):
    """Qwen3-Next as a reward model (its sequence-classification head reads each branch's last token), the kernel in
    float64 so every gradient holds 1e-5."""
    import transformers.models.qwen3_next.modeling_qwen3_next as qwen3_next
    from test_reward import make_pair
    from transformers import AutoModelForSequenceClassification

    run_kernel_in_float64(monkeypatch, qwen3_next)
    config = AutoConfig.from_pretrained(saved("qwen3_next"), num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config, dtype=EQUIVALENCE_DTYPE).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    stock, ours = make_pair(str(tmp_path), tokenizer, hh_rows)
    assert ours.prefix_share_fallback is None
    assert_equivalent(stock, ours, first_batch(stock, 4), first_batch(ours, 4))


@pytest.mark.parametrize("kind", ["orpo", "cpo"])
def test_orpo_and_simpo_match_stock(kind, saved, tokenizer):
    """ORPO (the prompt scored too) on Nemotron-H's Mamba2, SimPO on LFM2's convolution."""
    from test_orpo_cpo import assert_equivalent as paired_equivalent
    from test_orpo_cpo import first_batch as paired_batch
    from test_orpo_cpo import make_pair, short_rows

    family, config = ("nemotron_h", {}) if kind == "orpo" else ("lfm2", {"loss_type": "simpo", "cpo_alpha": 0.0})
    stock, ours = make_pair(kind, saved(family), tokenizer, short_rows("hh_helpful", 8), **config)
    assert ours.prefix_share_fallback is None
    paired_equivalent(stock, ours, paired_batch(stock), paired_batch(ours))


@pytest.mark.parametrize("family", ["lfm2", "qwen3_5_text"])
def test_grpo_matches_stock(family, saved, tokenizer, monkeypatch):
    """GRPO's left-padded prompts: stock zeroes the padding before each mixer (its own padding mask); the packed
    rows hold none. Same completions from one seed, then old-policy and reference log-probs, loss, gradients and
    metrics of the policy step."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5
    from online_setup import generate_and_score, generation_batch, real_prompts
    from test_online_equivalence import build, masked_relative
    from trl import GRPOConfig, GRPOTrainer

    from trl_prefix_share.trainers.online.grpo import PrefixSharedGRPOTrainer

    run_kernel_in_float64(monkeypatch, qwen3_5)  # every gradient at 1e-5 (see the float32 kernel test above)
    dataset = real_prompts(3)
    fields = dict(beta=0.1, num_iterations=2)
    stock = build(GRPOTrainer, GRPOConfig, saved(family), tokenizer, dataset, **fields)
    ours = build(PrefixSharedGRPOTrainer, GRPOConfig, saved(family), tokenizer, dataset, **fields)
    assert ours.prefix_share_enabled and ours.prefix_share_fallback is None
    batch = generation_batch(dataset, 3)
    expected, actual = generate_and_score(stock, batch), generate_and_score(ours, batch)
    assert torch.equal(actual["completion_ids"], expected["completion_ids"])
    assert bool((expected["prompt_mask"] == 0).any())  # left padding in stock's rows
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        assert masked_relative(actual[key], expected[key], expected["completion_mask"]) <= 1e-5, key
    assert_equivalent(stock, ours, expected, expected)


def test_lora_on_the_mixers_matches_stock(saved, tokenizer, hh_rows, monkeypatch):
    """LoRA inside the gated-delta layers (its projections) and on attention: the adapter-disabled reference and the
    policy both run the segmented mixers; the kernel in float64, so every gradient holds 1e-5."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen3_5
    from peft import LoraConfig
    from test_dpo_equivalence import make_pair

    run_kernel_in_float64(monkeypatch, qwen3_5)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj_qkv", "out_proj", "q_proj"], task_type="CAUSAL_LM")
    stock, ours = make_pair(saved("qwen3_5_text"), tokenizer, hh_rows, perturb_only="lora_B", peft_config=lora)
    assert ours.prefix_share_fallback is None
    assert_equivalent(stock, ours, first_batch(stock, 4), first_batch(ours, 4))
