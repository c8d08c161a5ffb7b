"""Helpers that run stock TRL and our trainer on the very same batch and compare losses, gradients and metrics."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

# The equivalence tests run their models in float64 (EQUIVALENCE_DTYPE). Both sides compute the same math in
# different kernels and summation orders (packed SDPA groups vs one padded SDPA call); in float32 that noise depends on
# the CPU's kernels and reached 1.17e-5 relative on one 2-core VM, past the 1e-5 bound. In float64 the model body's
# noise is ~1e-13; what is left is TRL's fused LM head, whose log-softmax accumulates in float32 whatever the input
# dtype (trl/kernels/chunked_logprob.py): measured over the whole suite, at most 1.25e-6 where both sides use it (DPO)
# and 5.6e-6 where only ours does (ORPO/CPO: stock takes a float64 log-softmax of its logits). So the bound stays
# 1e-5, with the machine-dependent part of the noise gone, while a wrong context (a leaked branch, a missed sliding
# window, a state carried across documents) moves them far more: a missed window shifted the Qwen2-MoE DPO loss by
# 0.24 relative and its gradients by > 1 (tests/test_unsupported_models.py).
EQUIVALENCE_DTYPE = torch.float64
RELATIVE_TOLERANCE = 1e-5
#: How TRL loads the test models: float64, and eager MoE experts (the grouped-matmul kernels take no float64).
MODEL_INIT_KWARGS = {"dtype": EQUIVALENCE_DTYPE, "experts_implementation": "eager"}


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def first_batch(trainer, size: int, dataset=None) -> dict:
    """Collate the first `size` prepared examples with the trainer's own collator, on its device."""
    dataset = trainer.train_dataset if dataset is None else dataset
    examples = [dataset[i] for i in range(size)]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def loss_and_grads(trainer, batch: dict, mode: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """One `compute_loss` + backward; returns the loss, the trainable parameters' grads and the logged metrics."""
    model = trainer.model
    model.train(mode == "train")
    model.zero_grad(set_to_none=True)
    trainer._metrics[mode].clear()
    loss = trainer.compute_loss(model, batch)
    if mode == "train":
        loss.backward()
    grads = {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad and param.grad is not None
    }
    metrics = {key: list(values) for key, values in trainer._metrics[mode].items()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, metrics


def assert_equivalent(
    stock,
    ours,
    stock_batch,
    our_batch,
    mode: str = "train",
    check_grads: bool = True,
    tolerance: float | None = None,
    gradient_floor: float = 0.0,
    zero_gradients: str | None = None,
) -> None:
    """Loss, every gradient and every stock metric must agree within `tolerance` (default RELATIVE_TOLERANCE).

    A gradient smaller than ``gradient_floor`` times the largest one is compared against that floor instead of its own
    size (for parameters a model's kernel handles in float32, whose tiny gradients hold float32 noise). Parameters
    whose names match the regular expression ``zero_gradients`` have a zero gradient in exact arithmetic (the key bias
    of an attention without rotary positions): both sides must hold less than 1e-6 of the largest gradient there
    (rounding noise, which cannot agree)."""
    tolerance = RELATIVE_TOLERANCE if tolerance is None else tolerance
    stock_loss, stock_grads, stock_metrics = loss_and_grads(stock, stock_batch, mode)
    our_loss, our_grads, our_metrics = loss_and_grads(ours, our_batch, mode)
    assert torch.isfinite(our_loss), f"our loss is {our_loss}"
    assert relative_difference(our_loss, stock_loss) <= tolerance, (our_loss.item(), stock_loss.item())
    if check_grads and mode == "train":
        assert stock_grads, "stock TRL produced no gradients: the comparison would be empty"
        assert stock_grads.keys() == our_grads.keys()
        nonzero = 0
        largest = max(grad.double().norm().item() for grad in stock_grads.values())
        floor = gradient_floor * largest
        for name, expected in stock_grads.items():
            if zero_gradients is not None and re.search(zero_gradients, name):
                assert max(expected.norm().item(), our_grads[name].norm().item()) <= 1e-6 * largest, name
                continue
            scale = max(expected.double().norm().item(), floor)
            diff = (our_grads[name].double() - expected.double()).norm().item() / scale if scale > 0 else 0.0
            assert diff <= tolerance, f"gradient of {name} differs by {diff:.2e}"
            nonzero += int(expected.abs().sum() > 0)
        assert nonzero > 0, "all stock gradients are zero: the comparison would be vacuous"
    for key, expected in stock_metrics.items():
        actual = our_metrics[key]
        assert len(actual) == len(expected), key
        for a, e in zip(actual, expected, strict=True):
            if key == "num_tokens" or key.startswith("prefix_share/"):
                assert a == e, (key, a, e)
            else:
                assert math.isclose(a, e, rel_tol=1e-4, abs_tol=1e-5), (key, a, e)
    assert {"prefix_share/tokens", "prefix_share/stock_tokens", "prefix_share/token_ratio"} <= our_metrics.keys()


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1, only: str | None = None) -> None:
    """Move trainable weights by seeded noise (identical in both trainers, which start from identical weights), so the
    comparison is not made at the symmetric random-init point where many gradients vanish."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and (only is None or only in name):
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def cpu_args(config_cls, batch: int, **fields):
    """A trainer config for these CPU tests: fp32, no reporting, seed 0, `batch` examples per train/eval step."""
    import tempfile

    defaults = dict(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        report_to="none",
        seed=0,
        model_init_kwargs=dict(MODEL_INIT_KWARGS),
    )
    return config_cls(**{**defaults, **fields})


def build_pair(make: Callable[[type], object]):
    """`make(trainer_cls)` builds a trainer; returns (stock, ours) with identical initial weights."""
    from trl import DPOTrainer

    from trl_prefix_share import PrefixSharedDPOTrainer

    return make(DPOTrainer), make(PrefixSharedDPOTrainer)


def float64_rotary_forward(self, x, position_ids):
    """A rotary embedding's forward (the Llama form) with its angles in float64 for float64 inputs.

    transformers computes the angles ``position * inv_freq`` in float32 whatever the model dtype. Prefix trees give
    a left-padded sequence of online RL other position ids than stock (the same for every token of it: a shift that
    rotary attention does not see), so float32's rounding of larger or smaller angles is left as a ~1e-6 difference;
    in float64 it is ~1e-15 and the float64 tests keep their bound. Tests of the shift itself run without it."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    freqs = position_ids[..., None].to(dtype) * self.inv_freq.to(device=x.device, dtype=dtype)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotary_in_float64(patch, *modules) -> None:
    """Give the rotary embeddings of these modeling modules ``float64_rotary_forward`` (stock and ours alike)."""
    for module in modules:
        for name in dir(module):
            if name.endswith("RotaryEmbedding"):
                patch.setattr(getattr(module, name), "forward", float64_rotary_forward)


def trees_on_short_heads(*trainers):
    """Let these trainers' prefix trees merge prompts on as few as 2 common tokens (hh's "\\n\\nHuman:"), where the
    default minimum (32) keeps them one-level: the tests that check trees against stock on real data. Set on the
    packing choice the collators and passes read, so the trainers keep their plain TRL configs."""
    for trainer in trainers:
        trainer.prefix_share_packing.prefix_tree_min_shared_tokens = 2
    return trainers


def tree_depth(packed: dict) -> int:
    """The deepest node of a packed layout's prefix trees (0: roots only; 1: one-level documents, a prefix and its
    branches; 2 or more: prompts merged below a common start)."""
    from trl_prefix_share.core.mixers.segments import token_runs, tree_parents

    starts, lengths, _, _ = token_runs(packed["document_ids"].cpu(), packed["branch_ids"].cpu())
    parents = tree_parents(starts, lengths, packed["span_ends"].cpu()).tolist()
    depths: list[int] = []
    for parent in parents:
        depths.append(0 if parent < 0 else depths[parent] + 1)
    return max(depths, default=0)
