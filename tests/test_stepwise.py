"""sDPO: T=1 is plain DPO; step t's reference is the step t-1 model; an interrupted run resumes at its step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_dataset_rows
from datasets import Dataset
from equivalence import first_batch, relative_difference
from test_dpo_equivalence import dpo_args
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import DPOTrainer

from trl_prefix_share import PrefixSharedDPOTrainer
from trl_prefix_share.trainers.stepwise import StepwiseDPO, StepwiseDPOConfig, split_into_chunks


def sdpo_args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        num_train_epochs=1,
        learning_rate=5e-4,
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
    )
    defaults.update(overrides)
    return dpo_args(**defaults)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def rows():
    return load_dataset_rows("hh_harmless", 8)


def test_one_step_equals_plain_dpo(model_dir, tokenizer, rows, tmp_path):
    plain = PrefixSharedDPOTrainer(
        model=model_dir("llama"), args=sdpo_args(tmp_path / "plain"), train_dataset=rows, processing_class=tokenizer
    )
    plain.train()
    sdpo = StepwiseDPO(
        model_dir("llama"),
        args=sdpo_args(tmp_path / "sdpo"),
        train_dataset=rows,
        processing_class=tokenizer,
        sdpo_config=StepwiseDPOConfig(num_chunks=1),
    )
    final = sdpo.train()
    expected, actual = losses(plain), losses(sdpo.trainers[0])
    assert len(actual) == len(expected) >= 3 and max(expected) - min(expected) > 1e-4
    for a, e in zip(actual, expected, strict=True):
        assert math.isclose(a, e, rel_tol=1e-5, abs_tol=1e-7), (a, e)
    for (name, p), q in zip(plain.model.named_parameters(), final.parameters(), strict=True):
        assert relative_difference(q, p) <= 1e-5, name
    assert all(entry.get("sdpo/step") == 1 for entry in sdpo.trainers[0].state.log_history if "loss" in entry)


def _reference_logps_of_saved_model(path, tokenizer, chunk, tmp_path):
    """Stock TRL, loading the saved step model from disk as its reference: an independent computation."""
    stock = DPOTrainer(
        model=str(path),
        args=dpo_args(output_dir=str(tmp_path / "check")),
        train_dataset=chunk,
        processing_class=tokenizer,
    )
    batch = first_batch(stock, 2)
    return torch.cat(stock.compute_ref_log_probs(stock.ref_model, batch))


def test_reference_of_step_two_is_the_step_one_model(model_dir, tokenizer, rows, tmp_path):
    sdpo = StepwiseDPO(
        model_dir("llama"),
        args=sdpo_args(tmp_path, learning_rate=5e-3),
        train_dataset=rows,
        processing_class=tokenizer,
        sdpo_config=StepwiseDPOConfig(num_chunks=2),
    )
    sdpo.train()
    chunk_two = split_into_chunks(rows, StepwiseDPOConfig(num_chunks=2))[1]
    step_two = sdpo.trainers[1]
    batch = first_batch(step_two, 2)
    ours = torch.cat(step_two.compute_ref_log_probs(step_two.ref_model, batch))
    expected = _reference_logps_of_saved_model(tmp_path / "step-1" / "model", tokenizer, chunk_two, tmp_path)
    initial = _reference_logps_of_saved_model(model_dir("llama"), tokenizer, chunk_two, tmp_path)
    assert relative_difference(ours, expected) <= 1e-5
    assert relative_difference(expected, initial) > 1e-4  # step 1 really moved the model
    state = json.loads((tmp_path / "sdpo_state.json").read_text())
    assert state["completed"] == [1, 2]


def _sequence_logps(model, tokenizer) -> torch.Tensor:
    """Plain forward (no TRL, no packing): summed log-probs of a few fixed texts."""
    texts = ["Human: how do I bake bread? Assistant: Mix flour and water.", "Human: hi Assistant: Hello there!"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
    logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["attention_mask"][:, 1:]).sum(-1)


class _RecordStepModels(TrainerCallback):
    """At the end of step 1: the trained model (base + adapter 1). At the start of step 2: its reference, i.e.
    the model with adapters disabled."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.step_one_end = self.step_two_reference = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.output_dir.endswith("step-1"):
            self.step_one_end = _sequence_logps(model, self.tokenizer)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.output_dir.endswith("step-2"):
            with model.disable_adapter():
                self.step_two_reference = _sequence_logps(model, self.tokenizer)


def test_lora_reference_of_step_two_is_the_merged_step_one_model(model_dir, tokenizer, rows, tmp_path):
    from peft import LoraConfig

    record = _RecordStepModels(tokenizer)
    initial = _sequence_logps(AutoModelForCausalLM.from_pretrained(model_dir("llama")), tokenizer)
    StepwiseDPO(
        model_dir("llama"),
        args=sdpo_args(tmp_path, learning_rate=5e-3),
        train_dataset=rows,
        processing_class=tokenizer,
        sdpo_config=StepwiseDPOConfig(num_chunks=2),
        callbacks=[record],
        peft_config=LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    ).train()
    assert relative_difference(record.step_two_reference, record.step_one_end) <= 1e-5
    assert relative_difference(record.step_one_end, initial) > 1e-5  # the adapter of step 1 changed the model


class _CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and "step-2" in args.output_dir:
            raise RuntimeError("simulated crash")


def test_interrupted_step_resumes_there(model_dir, tokenizer, rows, tmp_path):
    def run(callbacks):
        sdpo = StepwiseDPO(
            model_dir("llama"),
            args=sdpo_args(tmp_path, save_strategy="steps", save_steps=1),
            train_dataset=rows,
            processing_class=tokenizer,
            sdpo_config=StepwiseDPOConfig(num_chunks=2),
            callbacks=callbacks,
        )
        return sdpo, sdpo.train()

    with pytest.raises(RuntimeError, match="simulated crash"):
        run([_CrashAt(1)])
    state = json.loads((tmp_path / "sdpo_state.json").read_text())
    assert state["completed"] == [1]
    step_one = tmp_path / "step-1" / "model" / "model.safetensors"
    written = step_one.stat().st_mtime_ns
    sdpo, _ = run([])
    assert len(sdpo.trainers) == 1  # only step 2 ran: step 1 was not redone
    assert step_one.stat().st_mtime_ns == written
    assert sdpo.trainers[0].state.global_step == 2  # resumed from checkpoint-1 of step 2, finished it
    assert json.loads((tmp_path / "sdpo_state.json").read_text())["completed"] == [1, 2]
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "step-1" / "model")
    assert sum(p.numel() for p in resumed.parameters()) > 0


def test_a_different_plan_is_refused_on_resume(model_dir, tokenizer, rows, tmp_path):
    StepwiseDPO(
        model_dir("llama"),
        args=sdpo_args(tmp_path),
        train_dataset=rows,
        processing_class=tokenizer,
        sdpo_config=StepwiseDPOConfig(num_chunks=2),
    ).train()
    with pytest.raises(ValueError, match="different sDPO plan"):
        StepwiseDPO(
            model_dir("llama"),
            args=sdpo_args(tmp_path),
            train_dataset=rows,
            processing_class=tokenizer,
            sdpo_config=StepwiseDPOConfig(num_chunks=4),
        ).train()


def test_chunking_rules():
    data = Dataset.from_list([{"x": i, "source": "b" if i % 3 else "a"} for i in range(10)])
    by_column = split_into_chunks(data, StepwiseDPOConfig(chunk_column="source"))
    assert [c["x"] for c in by_column] == [[0, 3, 6, 9], [1, 2, 4, 5, 7, 8]]
    assert [len(c) for c in split_into_chunks(data, StepwiseDPOConfig(chunk_sizes=[3, 7]))] == [3, 7]
    assert [len(c) for c in split_into_chunks(data, StepwiseDPOConfig(chunk_fractions=[0.5, 0.5]))] == [5, 5]
    assert [len(c) for c in split_into_chunks(data, StepwiseDPOConfig(num_chunks=3))] == [4, 3, 3]
    with pytest.raises(ValueError, match="sum to"):
        split_into_chunks(data, StepwiseDPOConfig(chunk_sizes=[3, 3]))
    with pytest.raises(ValueError, match="at least one example"):
        split_into_chunks(data, StepwiseDPOConfig(chunk_sizes=[10, 0]))


def test_easy_to_hard_ordering(model_dir, tokenizer, rows, tmp_path):
    indexed = rows.add_column("idx", list(range(len(rows))))
    sdpo = StepwiseDPO(
        model_dir("llama"),
        args=sdpo_args(tmp_path),
        train_dataset=indexed,
        processing_class=tokenizer,
        sdpo_config=StepwiseDPOConfig(num_chunks=2, order_by_difficulty=True),
    )
    ordered = sdpo.plan()
    stock = DPOTrainer(
        model=model_dir("llama"),
        args=dpo_args(precompute_ref_log_probs=True),
        train_dataset=indexed,
        processing_class=tokenizer,
    )
    prepared = stock.train_dataset
    margins = {
        i: c - r
        for i, c, r in zip(prepared["idx"], prepared["ref_chosen_logps"], prepared["ref_rejected_logps"], strict=True)
    }
    sequence = list(ordered[0]["idx"]) + list(ordered[1]["idx"])
    assert sorted(sequence) == list(range(len(rows)))
    scored = [margins[i] for i in sequence if i in margins]
    assert scored == sorted(scored, reverse=True) and len(scored) >= 4  # easy (large margin) first
    dropped = [i for i in sequence if i not in margins]  # TRL drops these while preparing: they go last
    assert sequence[len(sequence) - len(dropped) :] == dropped


def test_precomputed_reference_is_recomputed_per_step(model_dir, tokenizer, rows, tmp_path):
    sdpo = StepwiseDPO(
        model_dir("llama"),
        args=sdpo_args(tmp_path, learning_rate=5e-3, precompute_ref_log_probs=True),
        train_dataset=rows,
        processing_class=tokenizer,
        sdpo_config=StepwiseDPOConfig(num_chunks=2),
    )
    sdpo.train()
    chunk_two = split_into_chunks(rows, StepwiseDPOConfig(num_chunks=2))[1]
    stock = DPOTrainer(
        model=str(tmp_path / "step-1" / "model"),
        args=dpo_args(output_dir=str(tmp_path / "check"), precompute_ref_log_probs=True),
        train_dataset=chunk_two,
        processing_class=tokenizer,
    )
    step_two = sdpo.trainers[1].train_dataset
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        expected = torch.tensor(stock.train_dataset[column])
        assert relative_difference(torch.tensor(step_two[column]), expected) <= 1e-5


@pytest.mark.parametrize("fresh", [True, False])
def test_learning_rate_schedule_per_step_or_continuous(fresh, model_dir, tokenizer, rows, tmp_path):
    sdpo = StepwiseDPO(
        model_dir("llama"),
        args=sdpo_args(tmp_path, lr_scheduler_type="linear"),
        train_dataset=rows,
        processing_class=tokenizer,
        sdpo_config=StepwiseDPOConfig(num_chunks=2, fresh_schedule=fresh),
    )
    sdpo.train()
    rates = [[e["learning_rate"] for e in t.state.log_history if "learning_rate" in e] for t in sdpo.trainers]
    assert all(a > b for steps in rates for a, b in zip(steps, steps[1:], strict=False))  # decays within a step
    if fresh:
        assert rates[1][0] == pytest.approx(rates[0][0])  # restarts
    else:
        assert rates[1][0] < rates[0][-1]  # carries on decaying across the step boundary
