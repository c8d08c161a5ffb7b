"""PrefixSharedORPOTrainer / PrefixSharedCPOTrainer vs stock trl.experimental ORPO / CPO on the same batches.

Loss, every gradient and every logged metric must agree, except `logits/chosen` and `logits/rejected`: stock averages
the logits of every position of its padded rows (prompt and padding included), ours the logits of the real completion
tokens (see `PrefixSharedPairedMixin.concatenated_forward`). Both trainers start from the same weights, moved by the
same seeded noise so that rewards and log-odds are not those of a near-uniform random model.

Batches are kept short (the tiny models still have the real 49k-token vocabulary, and stock scores every padded
position through it).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import conversational, read_jsonl, tiny_moe_config
from datasets import Dataset
from equivalence import RELATIVE_TOLERANCE, cpu_args, perturb, relative_difference, tree_depth, trees_on_short_heads
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from trl_prefix_share.core.packing import PACKED_KEY
from trl_prefix_share.trainers.paired.cpo import PrefixSharedCPOConfig, PrefixSharedCPOTrainer
from trl_prefix_share.trainers.paired.orpo import PrefixSharedORPOConfig, PrefixSharedORPOTrainer
from trl_prefix_share.trainers.paired.validation import document_tokens, validate_paired_dataset

BATCH = 2
# The one documented difference: stock's mean runs over padded positions we never compute.
LOGIT_METRICS = ("logits/chosen", "logits/rejected")
STOCK = {"orpo": (ORPOTrainer, ORPOConfig), "cpo": (CPOTrainer, CPOConfig)}
OURS = {
    "orpo": (PrefixSharedORPOTrainer, PrefixSharedORPOConfig),
    "cpo": (PrefixSharedCPOTrainer, PrefixSharedCPOConfig),
}
# CPO loss settings: every loss_type, with the knobs that change it. "alphapo" is CPOConfig sugar for simpo with
# cpo_alpha=0; the AlphaPO reward shape itself is `alpha != 0`, valid with every loss type.
CPO_SETTINGS = [
    dict(loss_type="sigmoid", label_smoothing=0.1),
    dict(loss_type="hinge"),
    dict(loss_type="ipo"),
    dict(loss_type="simpo", simpo_gamma=0.3, label_smoothing=0.1),
    dict(loss_type="simpo", cpo_alpha=0.0, alpha=0.25),  # alphapo
    dict(loss_type="ipo", cpo_alpha=0.5, alpha=-0.1),
]


def short_rows(name: str, count: int, max_chars: int = 600, offset: int = 0) -> Dataset:
    """The first `count` rows (after `offset`) whose prompt and both responses total under `max_chars` characters."""
    rows = [r for r in read_jsonl(name, 400) if len(r.get("prompt", "") + r["chosen"] + r["rejected"]) < max_chars]
    return Dataset.from_list(rows[offset : offset + count])


def make_args(config_cls, **overrides):
    return cpu_args(config_cls, BATCH, **{**dict(max_length=512, beta=0.5), **overrides})


def make_pair(kind: str, model_path: str, tokenizer, dataset, perturb_only: str | None = None, **config):
    """(stock, ours) trainers of `kind` with identical weights; `config` goes to both configs."""
    trainers = []
    for trainer_cls, config_cls in (STOCK[kind], OURS[kind]):
        trainer = trainer_cls(
            model=model_path,
            args=make_args(config_cls, **config),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        perturb(trainer.model, only=perturb_only)
        trainers.append(trainer)
    return tuple(trainers)


def first_batch(trainer, size: int = BATCH, dataset=None) -> dict:
    dataset = trainer.train_dataset if dataset is None else dataset
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(size)]))


def loss_grads_metrics(trainer, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """One `compute_loss` (the path `train()` takes) and backward."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    loss, metrics = trainer.compute_loss(model, batch, return_outputs=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    trainer._stored_metrics.clear()
    return loss.detach(), grads, metrics


def assert_equivalent(stock, ours, stock_batch: dict, our_batch: dict) -> dict[str, float]:
    """Loss and every gradient within RELATIVE_TOLERANCE (norm-relative), every metric but the logit means close."""
    stock_loss, stock_grads, stock_metrics = loss_grads_metrics(stock, stock_batch)
    our_loss, our_grads, our_metrics = loss_grads_metrics(ours, our_batch)
    assert torch.isfinite(stock_loss), "stock loss is not finite: the comparison would be meaningless"
    assert relative_difference(our_loss, stock_loss) <= RELATIVE_TOLERANCE, (our_loss.item(), stock_loss.item())
    assert stock_grads.keys() == our_grads.keys() and stock_grads
    for name, expected in stock_grads.items():
        diff = relative_difference(our_grads[name], expected)
        assert diff <= RELATIVE_TOLERANCE, f"gradient of {name} differs by {diff:.2e}"
    assert sum(int(g.abs().sum() > 0) for g in stock_grads.values()) > 0
    compared = 0
    for key, expected in stock_metrics.items():
        if key.endswith(LOGIT_METRICS):
            assert math.isfinite(our_metrics[key])
            continue
        assert math.isclose(our_metrics[key], expected, rel_tol=1e-4, abs_tol=1e-6), (key, our_metrics[key], expected)
        compared += 1
    assert compared >= 7
    assert our_metrics["prefix_share/token_ratio"] > 1.0
    width = max(stock_batch["chosen_input_ids"].size(1), stock_batch["rejected_input_ids"].size(1))
    assert our_metrics["prefix_share/stock_tokens"] == 2 * stock_batch["chosen_input_ids"].size(0) * width
    return our_metrics


@pytest.fixture(scope="module")
def hh_rows() -> Dataset:
    return short_rows("hh_helpful", 8)


@pytest.fixture(scope="module")
def shared_pair(model_dir, tokenizer, hh_rows):
    """Factory: one (stock, ours) pair per (kind, family) for the module (trainers are slow to build). Users set every
    loss knob they rely on and must not train the weights."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(kind: str, family: str) -> tuple:
        if (kind, family) not in cache:
            _, ours = cache[kind, family] = make_pair(kind, model_dir(family), tokenizer, hh_rows)
            trees_on_short_heads(ours)
        return cache[kind, family]

    return get


def set_cpo_loss(trainer, loss_type: str, **knobs) -> None:
    """Set CPO's loss knobs on a built trainer (CPOTrainer reads them at every step)."""
    trainer.loss_type, trainer.simpo_gamma = loss_type, knobs.get("simpo_gamma", 0.5)
    trainer.label_smoothing = knobs.get("label_smoothing", 0.0)
    trainer.cpo_alpha, trainer.alpha = knobs.get("cpo_alpha", 1.0), knobs.get("alpha", 0.0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_orpo_matches_stock(family, shared_pair):
    stock, ours = shared_pair("orpo", family)
    our_batch = first_batch(ours)
    # The NLL covers prompt + chosen: the chosen rows are scored from their second token, the shared prompt once.
    packed = our_batch[PACKED_KEY]
    lengths = our_batch["chosen_attention_mask"].sum(1)
    assert int(packed["branch_lengths"][:BATCH].sum()) == int((lengths - 1).sum())
    assert_equivalent(stock, ours, first_batch(stock), our_batch)
    if family != "llama":
        return
    later = range(2, 2 + BATCH)
    try:
        for beta in (2.0,):
            stock.beta = ours.beta = beta
            assert_equivalent(
                stock,
                ours,
                first_batch(stock, dataset=stock.train_dataset.select(later)),
                first_batch(ours, dataset=ours.train_dataset.select(later)),
            )
    finally:
        stock.beta = ours.beta = 0.5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cpo_every_loss_type_matches_stock(family, shared_pair):
    stock, ours = shared_pair("cpo", family)
    stock_batch, our_batch = first_batch(stock), first_batch(ours)
    assert tree_depth(our_batch[PACKED_KEY]) >= 2  # hh's prompts merged below their common "\n\nHuman:"
    # Every setting on llama; on qwen2 one of each averaging (summed: sigmoid; averaged: ipo, simpo, alphapo).
    settings = CPO_SETTINGS if family == "llama" else [CPO_SETTINGS[i] for i in (0, 2, 3, 4)]
    for setting in settings:
        for trainer in (stock, ours):
            set_cpo_loss(trainer, **setting)
        metrics = assert_equivalent(stock, ours, stock_batch, our_batch)
        if setting.get("cpo_alpha", 1.0) == 0.0:
            assert metrics["nll_loss"] == 0.0


def test_alphapo_config_sugar(shared_pair, model_dir, tokenizer, hh_rows):
    """`loss_type="alphapo"` in the config (CPOConfig turns it into simpo with cpo_alpha=0) goes through unchanged."""
    stock, _ = shared_pair("cpo", "llama")
    set_cpo_loss(stock, "simpo", cpo_alpha=0.0, alpha=0.25)
    ours = PrefixSharedCPOTrainer(
        model=model_dir("llama"),
        args=make_args(CPOConfig, loss_type="alphapo", alpha=0.25),
        train_dataset=hh_rows,
        processing_class=tokenizer,
    )
    perturb(ours.model)
    assert ours.loss_type == "simpo" and ours.cpo_alpha == 0.0 and ours.alpha == 0.25
    # A plain CPOConfig gets the prefix-sharing defaults.
    assert ours.prefix_share_args.share_prefix and ours.prefix_share_args.max_row_tokens is None
    assert_equivalent(stock, ours, first_batch(stock), first_batch(ours))


@pytest.mark.parametrize(
    ("kind", "dataset_name", "chat"),
    [("orpo", "pandalm", False), ("cpo", "ultrafeedback", True)],
)
def test_explicit_prompt_and_conversational_data(kind, dataset_name, chat, model_dir, tokenizer):
    """Explicit-prompt data as strings and as chat messages (through the tokenizer's chat template)."""
    rows = short_rows(dataset_name, BATCH, max_chars=900)
    rows = conversational(rows) if chat else rows
    config = dict(loss_type="simpo") if kind == "cpo" else {}
    stock, ours = make_pair(kind, model_dir("llama"), tokenizer, rows, **config)
    if chat:
        assert ours.train_dataset[0]["prompt"].startswith("<|im_start|>")
    assert_equivalent(stock, ours, first_batch(stock), first_batch(ours))


@pytest.mark.parametrize("kind", ["orpo", "cpo"])
def test_peft_lora(kind, model_dir, tokenizer, hh_rows):
    from peft import LoraConfig

    def make(trainer_cls, config_cls):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
        trainer = trainer_cls(
            model=model_dir("qwen2"),
            args=make_args(config_cls),
            train_dataset=hh_rows,
            processing_class=tokenizer,
            peft_config=lora,
        )
        perturb(trainer.model, only="lora_B")
        return trainer

    stock, ours = make(*STOCK[kind]), make(*OURS[kind])
    stock_batch, our_batch = first_batch(stock), first_batch(ours)
    assert_equivalent(stock, ours, stock_batch, our_batch)
    _, grads, _ = loss_grads_metrics(ours, our_batch)
    assert grads and all("lora_" in name for name in grads)


def test_packing_options_stay_exact(shared_pair, model_dir, tokenizer, hh_rows):
    stock, default = shared_pair("orpo", "llama")
    longest = max(document_tokens(example, True, True) for example in default.train_dataset)
    for options in (dict(share_prefix=False), dict(max_row_tokens=longest), dict(pack_documents=False)):
        ours = PrefixSharedORPOTrainer(
            model=model_dir("llama"),
            args=make_args(PrefixSharedORPOConfig, **options),
            train_dataset=hh_rows,
            processing_class=tokenizer,
        )
        perturb(ours.model)
        batch = first_batch(ours, 4)
        if "max_row_tokens" in options:
            assert batch[PACKED_KEY]["input_ids"].size(0) > 1
        if "pack_documents" in options:  # one document (pair) per row
            assert batch[PACKED_KEY]["input_ids"].size(0) == 4
        assert_equivalent(stock, ours, first_batch(stock, 4), batch)


def test_plain_forward_and_evaluate(shared_pair):
    """Without a packed layout the switched model computes what the stock model computes (generation path);
    `evaluate()` logs the same metrics."""
    stock, ours = shared_pair("orpo", "llama")
    batch = first_batch(stock)
    stock.model.eval(), ours.model.eval()
    with torch.no_grad():
        kwargs = dict(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"])
        assert torch.allclose(ours.model(**kwargs).logits, stock.model(**kwargs).logits, atol=1e-5, rtol=1e-5)
    # A batch that did not come through our collator is packed in the forward, with the same result.
    our_batch = first_batch(ours)
    with torch.no_grad():
        packed = ours.concatenated_forward(ours.model, our_batch)
        unpacked = ours.concatenated_forward(ours.model, {k: v for k, v in our_batch.items() if k != PACKED_KEY})
    for a, b in zip(packed, unpacked, strict=True):
        assert torch.equal(a, b)
    # ORPO/CPO tokenize eval data at construction only, so evaluate on already tokenized rows.
    stock_metrics = stock.evaluate(stock.train_dataset.select(range(4, 8)))
    our_metrics = ours.evaluate(ours.train_dataset.select(range(4, 8)))
    compared = 0
    for key, expected in stock_metrics.items():
        if key.endswith(("runtime", "per_second", "_time") + LOGIT_METRICS):
            continue
        assert math.isclose(our_metrics[key], expected, rel_tol=1e-4, abs_tol=1e-6), (key, our_metrics[key], expected)
        compared += 1
    assert compared >= 10 and our_metrics["eval_prefix_share/token_ratio"] > 1


def _train_losses(trainer) -> list[float]:
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("kind", ["orpo", "cpo"])
def test_short_training_curve(kind, model_dir, tokenizer, hh_rows):
    """`train()` with the trainers' defaults (gradient checkpointing on): the loss curves agree step by step."""
    config = dict(max_steps=5, logging_steps=1, learning_rate=1e-3)
    if kind == "cpo":
        config["loss_type"] = "simpo"
    stock, ours = make_pair(kind, model_dir("llama"), tokenizer, hh_rows, **config)
    assert ours.args.gradient_checkpointing
    stock_losses, our_losses = _train_losses(stock), _train_losses(ours)
    assert len(stock_losses) == len(our_losses) == 5
    assert max(stock_losses) - min(stock_losses) > 1e-3
    for step, (a, e) in enumerate(zip(our_losses, stock_losses, strict=True)):
        assert math.isclose(a, e, rel_tol=1e-4, abs_tol=1e-6), (step, a, e)
    assert ours.prefix_share_totals["stock_tokens"] > ours.prefix_share_totals["tokens"] > 0


def test_empty_response_is_an_error_not_nan(model_dir, tokenizer, caplog):
    """A prompt that fills `max_length` leaves an empty response: stock's loss is NaN, ours names the examples."""
    rows = short_rows("hh_helpful", 2, max_chars=300)
    lengths = [len(tokenizer(r[side])["input_ids"]) for r in rows for side in ("chosen", "rejected")]
    max_length = max(lengths) + 8
    prompt = "\n\nHuman: " + "long question " * (max_length // 2 + 4) + "\n\nAssistant:"
    long_row = {"chosen": prompt + " yes", "rejected": prompt + " no"}
    data = Dataset.from_list([rows[0], long_row, rows[1], long_row])
    stock = ORPOTrainer(
        model=model_dir("llama"),
        args=make_args(ORPOConfig, max_length=max_length),
        train_dataset=data,
        processing_class=tokenizer,
    )
    stock_loss, _ = stock.get_batch_loss_metrics(stock.model, first_batch(stock))
    assert torch.isnan(stock_loss)
    for trainer_cls, config_cls in (OURS["orpo"], OURS["cpo"]):
        with pytest.raises(ValueError, match=r"example\(s\) 1, 3 of the train dataset have an empty") as error:
            trainer_cls(
                model=model_dir("llama"),
                args=make_args(config_cls, max_length=max_length),
                train_dataset=data,
                processing_class=tokenizer,
            )
        assert "drop_invalid_examples=True" in str(error.value) and "max_length" in str(error.value)
    with caplog.at_level(logging.WARNING):
        ours = PrefixSharedORPOTrainer(
            model=model_dir("llama"),
            args=make_args(PrefixSharedORPOConfig, max_length=max_length, drop_invalid_examples=True),
            train_dataset=data,
            processing_class=tokenizer,
        )
    assert "Dropping 2 example(s)" in caplog.text and len(ours.train_dataset) == 2
    loss, _ = ours.get_batch_loss_metrics(ours.model, first_batch(ours))
    assert torch.isfinite(loss)
    # A batch that bypassed the up-front check (e.g. a streaming dataset) is refused at packing, never NaN.
    with pytest.raises(ValueError, match="rejected of pair 1"):
        ours.data_collator([stock.train_dataset[i] for i in (0, 1)])


def test_row_budget_smaller_than_a_document_is_named(tokenizer):
    data = Dataset.from_list(
        [
            {
                "chosen_input_ids": [1, 2, 3, 4, 5],
                "chosen_labels": [-100, -100, -100, 4, 5],
                "rejected_input_ids": [1, 2, 3, 6],
                "rejected_labels": [-100, -100, -100, 6],
            },
            {
                "chosen_input_ids": list(range(1, 40)),
                "chosen_labels": [-100] * 30 + list(range(31, 40)),
                "rejected_input_ids": list(range(1, 31)) + [50],
                "rejected_labels": [-100] * 30 + [50],
            },
        ]
    )
    from trl_prefix_share.core.options import PrefixShareArguments

    # Example 1 shares 30 prompt tokens: 39 + 31 - 29 = 41 tokens, example 0: 5 + 4 - 2 = 7.
    assert len(validate_paired_dataset(data, "train", PrefixShareArguments(max_row_tokens=41), True)) == 2
    with pytest.raises(ValueError, match=r"example\(s\) 1 of the train dataset need up to 41 tokens"):
        validate_paired_dataset(data, "train", PrefixShareArguments(max_row_tokens=40), True)
    kept = validate_paired_dataset(
        data, "train", PrefixShareArguments(max_row_tokens=40, drop_invalid_examples=True), False
    )
    assert len(kept) == 1


def test_moe_aux_loss_matches_stock(tokenizer, hh_rows, tmp_path):
    """MoE: the ORPO part and the router's load-balancing loss both match stock (each packed token weighted by the
    stock rows holding it, the shared prompt by both halves)."""
    from transformers import AutoModelForCausalLM

    config = tiny_moe_config(len(tokenizer), router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    stock, ours = make_pair("orpo", str(tmp_path), tokenizer, hh_rows)
    outputs = {}
    for name, trainer in (("stock", stock), ("ours", ours)):
        batch = first_batch(trainer)
        with torch.no_grad():
            *_, aux_loss = trainer.concatenated_forward(trainer.model, batch)
            loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        outputs[name] = (loss.item(), aux_loss.item(), metrics["nll_loss"], metrics["log_odds_ratio"])
    (stock_loss, stock_aux, *stock_rest), (our_loss, our_aux, *our_rest) = outputs["stock"], outputs["ours"]
    assert math.isfinite(our_aux) and our_aux > 0
    assert math.isclose(our_aux, stock_aux, rel_tol=1e-6), (our_aux, stock_aux)
    assert math.isclose(our_loss, stock_loss, rel_tol=1e-5), (our_loss, stock_loss)
    for a, e in zip(our_rest, stock_rest, strict=True):
        assert math.isclose(a, e, rel_tol=1e-4, abs_tol=1e-6)
