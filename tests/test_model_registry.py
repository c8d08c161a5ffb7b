"""Every causal-LM family of the installed transformers: served exactly, or the exact fallback; never a silent
difference.

For each model type in transformers' causal-LM registry that builds from a small config, the trainers' own
decision (`install_or_fall_back`: the structural check, then the construction probe) runs on a tiny model. If it
switches the model to the packed forward, the packed log-probabilities and gradients of an independent batch (real
tokens, several documents in a row, a prompt with four responses, sequences longer than a clipped sliding window)
must match each sequence scored alone by the model's own forward within 1e-4. If it falls back, it must say why.
The verdicts are the table in `docs/model_support.md` (written by `docs/make_model_table.py`; a test fails when
they drift apart).
"""

from __future__ import annotations

import re
import types
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import read_jsonl
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from trl_prefix_share.core.installer import PrefixShareFallbackWarning, install_or_fall_back
from trl_prefix_share.core.mixers.kinds import compute_precision
from trl_prefix_share.core.model_structure import inspect_model
from trl_prefix_share.core.model_support import (
    UnsupportedModelError,
    check_architecture,
    enable_prefix_sharing,
    verify_packed_forward,
)
from trl_prefix_share.core.options import PrefixShareArguments
from trl_prefix_share.core.packing import PACKED_KEY, PackingOptions
from trl_prefix_share.core.preference.collator import PrefixSharedPreferenceCollator
from trl_prefix_share.trainers.dpo.grouping import GroupByPrompt

VOCAB = 256
#: Small sizes every config is offered (fields a config does not have are ignored or stored unused).
SMALL = dict(
    vocab_size=VOCAB,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
)
#: Fields without which these families' configs reject the small sizes (their Mamba heads must tile the hidden size,
#: or their layer list must match the layer count): each hybrid gets one mixer layer and one attention layer.
FAMILY_FIELDS = {
    "granitemoehybrid": dict(
        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, layer_types=["mamba", "attention"]
    ),
    "bamba": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, attn_layer_indices=[1]),
    # Their default Mamba sizes (128 heads, states 128-256 wide) fit the parameter cap but made their float64 scans
    # the slowest tests of the suite (2 min, 20 s); the same structure at Bamba's small sizes.
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1),
    "nemotron_h": dict(mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1),
    "mamba2": dict(num_heads=4, head_dim=16, state_size=8, n_groups=1),
    "zamba2": dict(
        mamba_headdim=8, mamba_d_state=8, n_mamba_heads=8, layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1]
    ),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "kimi_linear": dict(
        layer_types=["linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse"],
        linear_head_dim=8,
        linear_num_heads=4,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        head_dim=8,
        num_experts=4,
        num_experts_per_token=2,
        num_key_value_heads=4,
    ),
}
#: Sliding windows are set this small, below the test sequences' lengths, wherever a config has one.
WINDOW = 12
#: Largest model the test builds (parameters): larger means the config ignores the small sizes above.
MAX_PARAMETERS = 3_000_000
#: float64 (see `equivalence.EQUIVALENCE_DTYPE`): the remaining noise is that of TRL's float32 log-softmax, ~1e-6.
DTYPE = torch.float64
TOLERANCE = 1e-5
#: Families with a served mixer whose kernel computes in float32 whatever the model's dtype (transformers' gated delta
#: rule, Mamba2 scan): the packed forward runs each sequence's scan in other chunks (the prefix, then the branch from
#: its state), so that float32 rounding differs from stock's. It shows on the decay parameters' tiny gradients, so
#: those families compare gradients below this share of the largest against it (tests/test_hybrid_mixers.py shows
#: the rest of the difference vanishes with the kernel in float64).
FLOAT32_KERNEL_GRADIENT_FLOOR = 1e-2
#: Gradients smaller than this share of the largest one are compared against that floor instead of their own size:
#: some are zero in theory (a key bias does not change a softmax) and hold only rounding noise.
GRADIENT_FLOOR = 1e-6
MODEL_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


class TooLarge(ValueError):
    """The config ignores the small sizes; its meta-device model still has a structure to check."""

    def __init__(self, size: int, meta_model: torch.nn.Module) -> None:
        super().__init__(f"{size} parameters with the small sizes (the config ignores them)")
        self.meta_model = meta_model


def tiny_config(model_type: str):
    """A small config of `model_type`, or a reason why none builds."""
    config = AutoConfig.for_model(model_type, **{**SMALL, **FAMILY_FIELDS.get(model_type, {})})
    text_config = config.get_text_config()
    if isinstance(getattr(text_config, "sliding_window", None), int) and text_config.sliding_window > WINDOW:
        text_config.sliding_window = WINDOW
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    size = sum(p.numel() for p in meta_model.parameters())
    if size > MAX_PARAMETERS:
        raise TooLarge(size, meta_model)
    return config


def build(model_type: str) -> torch.nn.Module:
    try:
        config = tiny_config(model_type)
        torch.manual_seed(0)
        # Eager experts: the grouped-matmul MoE kernels take no float64.
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE, experts_implementation="eager")
    except Exception as error:  # noqa: BLE001 - any failure means "does not build from a small config"
        pytest.skip(f"{model_type} does not build from a small config: {type(error).__name__}: {error}"[:300])
    return model.eval()


@pytest.fixture(scope="module")
def examples() -> list[dict[str, list[int]]]:
    """Real token sequences (shared UltraFeedback text through a byte-level map into the tiny vocabulary), with
    lengths past WINDOW; the first prompt has two pairs, so its document has four branches."""
    rows = read_jsonl("ultrafeedback", 3)

    def ids(text: str, length: int) -> list[int]:
        return [3 + byte % (VOCAB - 3) for byte in text.encode("utf-8")][:length]

    first, second, third = rows
    return [
        {
            "prompt_ids": ids(first["prompt"], 30),
            "chosen_ids": ids(first["chosen"], 14),
            "rejected_ids": ids(first["rejected"], 9),
        },
        {
            "prompt_ids": ids(second["prompt"], 5),
            "chosen_ids": ids(second["chosen"], 20),
            "rejected_ids": ids(second["rejected"], 16),
        },
        {
            "prompt_ids": ids(first["prompt"], 30),
            "chosen_ids": ids(third["chosen"], 11),
            "rejected_ids": ids(third["rejected"], 18),
        },
    ]


def fake_trainer() -> types.SimpleNamespace:
    """What `install_or_fall_back` reads of a trainer, with the default options (probe on, fallback on)."""
    return types.SimpleNamespace(
        prefix_share_args=PrefixShareArguments(),
        prefix_share_fallback=None,
        is_deepspeed_enabled=False,
        is_fsdp_enabled=False,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )


def log_probs_alone(model, batch, labels) -> torch.Tensor:
    """Each stock row scored alone, unpadded: the reference no layout can influence."""
    rows = []
    for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        out = model(
            input_ids=batch["input_ids"][row : row + 1, :length],
            labels=labels[row : row + 1, :length],
            fused_lm_head=True,
            use_cache=False,
        )
        rows.append(torch.nn.functional.pad(out.log_probs[0], (0, labels.size(1) - length)))
    return torch.stack(rows)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().norm().item()
    return (actual.double() - expected.double()).norm().item() / max(scale, 1e-30)


def grads_of(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_family(model_type: str, examples: list[dict[str, list[int]]]) -> str:
    """Run the trainers' decision on a tiny `model_type` and check its consequence; return the verdict for the table
    (``served exactly`` or ``exact fallback: <reason>``). Calls `pytest.skip` for a family that does not build.

    A family whose config ignores the small sizes is still judged by the structural check, on a meta-device model of
    that config (no weights): the check never runs the model, so its verdict is the trainers' under any launcher."""
    try:
        tiny_config(model_type)
    except TooLarge as large:
        structure = inspect_model(large.meta_model)
        if not structure.served:
            with pytest.raises(UnsupportedModelError):
                check_architecture(large.meta_model)
            return f"exact fallback (structural check): {structure.describe()}"
    except Exception:  # noqa: BLE001 - build() below skips with the reason
        pass
    model = build(model_type)
    try:
        add_fused_lm_head(model)
        batch = PrefixSharedPreferenceCollator(
            DataCollatorForPreference(pad_token_id=0), 0, PackingOptions(), group_documents=GroupByPrompt()
        )(examples)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        expected = log_probs_alone(model, batch, labels)
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"{model_type}: the stock fused-head forward does not run on this tiny config: {error}"[:300])
    trainer = fake_trainer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = install_or_fall_back(trainer, [model], enable_prefix_sharing, verify_packed_forward, "sdpa")
    if not served:
        fallback = [w for w in caught if issubclass(w.category, PrefixShareFallbackWarning)]
        assert trainer.prefix_share_fallback and len(fallback) == 1, model_type
        assert model.config._attn_implementation != "prefix_share"  # restored: stock numerics
        return f"exact fallback: {trainer.prefix_share_fallback}"
    mask = labels[:, 1:] != -100
    floor_share = GRADIENT_FLOOR if compute_precision(model) == DTYPE else FLOAT32_KERNEL_GRADIENT_FLOOR
    packed = model(
        input_ids=batch["input_ids"],
        labels=labels,
        fused_lm_head=True,
        use_cache=False,
        **{PACKED_KEY: batch[PACKED_KEY]},
    ).log_probs
    difference = relative(packed[mask], expected[mask])
    assert difference <= TOLERANCE, f"{model_type}: packed log-probs differ by {difference:.2e} relative"
    stock_grads = grads_of(model, log_probs_alone(model, batch, labels)[mask].sum())
    our_grads = grads_of(
        model,
        model(
            input_ids=batch["input_ids"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
            **{PACKED_KEY: batch[PACKED_KEY]},
        )
        .log_probs[mask]
        .sum(),
    )
    assert stock_grads.keys() == our_grads.keys() and stock_grads, f"{model_type}: different parameters get gradients"
    floor = floor_share * max(grad.double().norm().item() for grad in stock_grads.values())
    for name, grad in stock_grads.items():
        difference = (our_grads[name].double() - grad.double()).norm().item() / max(grad.double().norm().item(), floor)
        assert difference <= TOLERANCE, f"{model_type}: gradient of {name} differs by {difference:.2e} relative"
    return SERVED


SERVED = "served exactly"
TABLE = Path(__file__).resolve().parents[1] / "docs" / "model_support.md"


def table_version(text: str) -> str:
    """The transformers release the committed table was generated on (its header names it)."""
    return re.search(r"family of transformers (\S+), tried", text).group(1)


#: The table is exact only on the release it was generated on (the lock's). On another release in range (`make
#: test-latest`, `make test-lowest`) every family is still checked exact-or-fallback, and a new model type or a
#: changed verdict shows up as a warning naming the row, not as a failed suite.
TABLE_RELEASE = table_version(TABLE.read_text(encoding="utf-8"))
ON_TABLE_RELEASE = transformers.__version__ == TABLE_RELEASE


@pytest.fixture(scope="module")
def committed_table() -> dict[str, str]:
    return table_rows(TABLE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_is_exact_or_falls_back(model_type, examples, committed_table):
    """Each family's verdict, checked, and equal to its row of docs/model_support.md (so the table cannot drift,
    whichever test process runs the family)."""
    try:
        verdict = check_family(model_type, examples)
    except pytest.skip.Exception as skipped:
        assert_table_row(committed_table, model_type, skip_verdict(model_type, skipped.msg))
        raise
    assert_table_row(committed_table, model_type, verdict)


def assert_table_row(committed: dict[str, str], model_type: str, verdict: str) -> None:
    regenerate = "regenerate docs/model_support.md with `make model-table`"
    if not ON_TABLE_RELEASE:
        if committed.get(model_type) != table_cell(verdict):
            warnings.warn(
                f"transformers {transformers.__version__} (table: {TABLE_RELEASE}): | `{model_type}` | "
                f"{table_cell(verdict)} | (table: {committed.get(model_type, 'no row')})",
                stacklevel=2,
            )
        return
    assert model_type in committed, f"{model_type} is not in the table: {regenerate}"
    assert table_cell(verdict) == committed[model_type], f"the verdict of {model_type} changed: {regenerate}"


def skip_verdict(model_type: str, message: str) -> str:
    return "not tried: " + message.removeprefix(model_type).lstrip(": ")


def table_rows(text: str) -> dict[str, str]:
    """`model type -> verdict` from the markdown table of docs/model_support.md."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


@pytest.mark.skipif(not ON_TABLE_RELEASE, reason=f"the table lists the model types of transformers {TABLE_RELEASE}")
def test_support_table_lists_every_family(committed_table):
    """docs/model_support.md has one row per causal-LM model type of the installed transformers, no more."""
    assert sorted(committed_table) == MODEL_TYPES, "model types changed: regenerate docs/model_support.md"


def table_cell(verdict: str) -> str:
    """One verdict as a table cell: one line, no pipes, bounded length."""
    cell = " ".join(verdict.split()).replace("|", "/")
    return cell if len(cell) <= 240 else cell[:237] + "..."
