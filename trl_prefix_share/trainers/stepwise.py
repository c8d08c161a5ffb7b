"""Stepwise DPO (sDPO, arXiv 2403.19270): DPO chunk by chunk, each step's reference being the previous step's model.

Step t trains on chunk t, starting from the model of step t-1 and using that model, frozen, as its reference (step 1
uses the initial model). Every step gets a fresh trainer, so a fresh optimizer and learning-rate schedule. Each
step's model is saved in ``<output_dir>/step-<t>``, and ``<output_dir>/sdpo_state.json`` records the finished steps,
so an interrupted run resumes at the interrupted step (from its last checkpoint, if any): a finished step is never
redone, an unfinished one never skipped, and a run whose chunks differ from the recorded ones is refused.

With LoRA, the step t-1 adapter is merged into the base weights before step t, so "adapters disabled" is exactly the
step t-1 model; the step's saved model is the merged base plus its own adapter.

Named ``stepwise`` (module, CLI command ``trl-prefix-share stepwise``, recipes ``recipes/stepwise_*.yaml``), not
``sdpo``: TRL's ``trl.experimental.sdpo`` is a different method (self-distillation). What a saved run or a user's code
already holds keeps its 0.1 name: the ``sdpo_config`` keyword, the ``sdpo/step`` log key and ``sdpo_state.json`` (so a
run started before the rename resumes).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedModel, TrainerCallback

from trl_prefix_share.trainers.dpo.trainer import PrefixSharedDPOTrainer

logger = logging.getLogger(__name__)

STATE_FILE = "sdpo_state.json"
_INDEX_COLUMN = "__sdpo_index"


@dataclass
class StepwiseDPOConfig:
    """How the data is split into steps. Exactly one of `chunk_column`, `chunk_sizes`, `chunk_fractions` or
    `num_chunks` is used (checked in that order; `num_chunks=2` by default).

    Parameters:
        chunk_column: a dataset column whose sorted distinct values name the steps (e.g. the source data set).
        chunk_sizes: number of examples per step, in dataset order.
        chunk_fractions: fraction of the examples per step (they must sum to 1).
        num_chunks: split into this many equal chunks.
        order_by_difficulty: before splitting, sort examples easy to hard by the initial model's log-probability
            margin log p(chosen) - log p(rejected) (easy: already preferred). Costs one forward pass over the data.
        fresh_schedule: each step restarts the optimizer and learning-rate schedule (sDPO's recipe). `False` keeps
            one optimizer and one schedule over all steps (full fine-tuning only).
    """

    chunk_column: str | None = None
    chunk_sizes: list[int] | None = None
    chunk_fractions: list[float] | None = None
    num_chunks: int = 2
    order_by_difficulty: bool = False
    fresh_schedule: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def split_into_chunks(dataset: Dataset, config: StepwiseDPOConfig) -> list[Dataset]:
    """The per-step datasets, in step order."""
    size = len(dataset)
    if config.chunk_column is not None:
        values = dataset[config.chunk_column]
        return [dataset.select([i for i, v in enumerate(values) if v == key]) for key in sorted(set(values))]
    if config.chunk_sizes is not None:
        sizes = list(config.chunk_sizes)
        if sum(sizes) != size:
            raise ValueError(f"chunk_sizes {sizes} sum to {sum(sizes)}, but the dataset has {size} examples.")
    elif config.chunk_fractions is not None:
        if not math.isclose(sum(config.chunk_fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"chunk_fractions {config.chunk_fractions} must sum to 1.")
        sizes = [int(f * size) for f in config.chunk_fractions]
        sizes[-1] += size - sum(sizes)
    else:
        if config.num_chunks < 1:
            raise ValueError("num_chunks must be at least 1.")
        base, extra = divmod(size, config.num_chunks)
        sizes = [base + (1 if i < extra else 0) for i in range(config.num_chunks)]
    if any(s <= 0 for s in sizes):
        raise ValueError(f"Every sDPO step needs at least one example; chunk sizes are {sizes}.")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [dataset.select(range(start, start + n)) for start, n in zip(starts, sizes, strict=True)]


def chunk_fingerprint(chunks: Sequence[Dataset]) -> str:
    """Identifies the step plan, so a resume with different chunks is refused instead of silently mixing plans."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(str(len(chunk)).encode())
        digest.update(getattr(chunk, "_fingerprint", "").encode())
    return digest.hexdigest()[:16]


class _StepLogger(TrainerCallback):
    """Adds the sDPO step to every log line, so curves from different steps can be told apart."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer has already stored a copy of `logs` in the history; tag both.
        if logs is not None:
            logs["sdpo/step"] = self.step
        if state.log_history:
            state.log_history[-1]["sdpo/step"] = self.step


class StepwiseDPO:
    """Runs sDPO with [`PrefixSharedDPOTrainer`] (or any DPOTrainer subclass given as `trainer_cls`).

    Example:
        ```python
        sdpo = StepwiseDPO(model, args=DPOConfig(output_dir="out", ...), train_dataset=ds, processing_class=tok,
                           sdpo_config=StepwiseDPOConfig(num_chunks=3))
        model = sdpo.train()
        ```
    `args.output_dir` holds `step-1`, `step-2`, ... and the state file; each step's trainer writes its checkpoints
    under its own step directory.
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        args,
        train_dataset: Dataset,
        processing_class,
        sdpo_config: StepwiseDPOConfig | None = None,
        peft_config=None,
        eval_dataset: Dataset | None = None,
        trainer_cls: type = PrefixSharedDPOTrainer,
        callbacks: list[TrainerCallback] | None = None,
    ) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model) if isinstance(model, str) else model
        self.args = args
        self.train_dataset = train_dataset
        self.processing_class = processing_class
        self.config = sdpo_config or StepwiseDPOConfig()
        self.peft_config = peft_config
        self.eval_dataset = eval_dataset
        self.trainer_cls = trainer_cls
        self.callbacks = list(callbacks or [])
        self.output_dir = Path(args.output_dir)
        if not self.config.fresh_schedule and peft_config is not None:
            raise ValueError(
                "fresh_schedule=False keeps one optimizer across steps: full fine-tuning only (a new "
                "LoRA adapter is created at every step)."
            )
        self.trainers: list = []

    # -- plan and state ---------------------------------------------------------------------------------------------

    def plan(self) -> list[Dataset]:
        dataset = self.train_dataset
        if self.config.order_by_difficulty:
            dataset = self._sorted_easy_to_hard(dataset)
        return split_into_chunks(dataset, self.config)

    def _state_path(self) -> Path:
        return self.output_dir / STATE_FILE

    def _load_state(self, fingerprint: str, num_steps: int) -> dict:
        path = self._state_path()
        if not path.exists():
            return {"fingerprint": fingerprint, "num_steps": num_steps, "completed": []}
        state = json.loads(path.read_text())
        if state["fingerprint"] != fingerprint or state["num_steps"] != num_steps:
            raise ValueError(
                f"{path} records a different sDPO plan ({state['num_steps']} steps, fingerprint "
                f"{state['fingerprint']}) than this run ({num_steps} steps, {fingerprint}). Use a new output_dir, or "
                "the same data and chunking to resume."
            )
        return state

    def _save_state(self, state: dict) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self._state_path())  # atomic: a crash never leaves a half-written state

    # -- running ----------------------------------------------------------------------------------------------------

    def train(self) -> PreTrainedModel:
        """Run every unfinished step; returns the final model (LoRA adapters merged)."""
        chunks = self.plan()
        state = self._load_state(chunk_fingerprint(chunks), len(chunks))
        completed: list[int] = state["completed"]
        if completed:
            self.model = self._load_step_model(max(completed))
            logger.info("sDPO: steps %s already finished; resuming at step %d.", completed, max(completed) + 1)
        optimizers = (None, None)
        if not self.config.fresh_schedule:
            optimizers = self._continuous_optimizers(chunks, first_step=len(completed) + 1)
        for step in range(len(completed) + 1, len(chunks) + 1):
            reference = "the initial model" if step == 1 else f"the step {step - 1} model"
            logger.warning(
                "sDPO step %d/%d: %d examples, reference = %s.", step, len(chunks), len(chunks[step - 1]), reference
            )
            trainer = self._run_step(step, chunks[step - 1], optimizers)
            self.trainers.append(trainer)
            self._save_step_model(trainer, step)
            completed.append(step)
            state["completed"] = completed
            self._save_state(state)
        return self.model

    def _step_args(self, step: int):
        args = copy.deepcopy(self.args)
        args.output_dir = str(self.output_dir / f"step-{step}")
        return args

    def _run_step(self, step: int, chunk: Dataset, optimizers):
        args = self._step_args(step)
        model = self.model
        ref_model = None
        if self.peft_config is None and not args.precompute_ref_log_probs:
            ref_model = copy.deepcopy(model).eval()  # the step t-1 model, frozen
            for param in ref_model.parameters():
                param.requires_grad_(False)
        trainer = self.trainer_cls(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=chunk,
            eval_dataset=self.eval_dataset,
            processing_class=self.processing_class,
            peft_config=self.peft_config,
            callbacks=[*self.callbacks, _StepLogger(step)],
            optimizers=optimizers,
        )
        checkpoints = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
        return trainer

    def _save_step_model(self, trainer, step: int) -> None:
        """Save the step's model; with LoRA, merge the adapter so the next step trains on (and refers to) it."""
        model = trainer.model
        if self.peft_config is not None:
            model = model.merge_and_unload()
        self._strip_training_patches(model)
        self.model = model
        target = self.output_dir / f"step-{step}" / "model"
        model.save_pretrained(target)
        self.processing_class.save_pretrained(target)

    def _load_step_model(self, step: int) -> PreTrainedModel:
        path = self.output_dir / f"step-{step}" / "model"
        return AutoModelForCausalLM.from_pretrained(path, dtype=self.model.dtype)

    @staticmethod
    def _strip_training_patches(model: PreTrainedModel) -> None:
        """Drop the per-instance forward wrappers (fused LM head, packed forward) so the next step installs fresh
        ones on the plain model."""
        if "forward" in vars(model):
            del model.forward

    def _continuous_optimizers(self, chunks: Sequence[Dataset], first_step: int):
        """One AdamW and one schedule spanning every step (`fresh_schedule=False`)."""
        from transformers import get_scheduler

        args = self.args
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
        total = sum(math.ceil(len(c) / batch) * int(args.num_train_epochs) for c in chunks)
        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(total), num_training_steps=total
        )
        done = sum(math.ceil(len(c) / batch) * int(args.num_train_epochs) for c in chunks[: first_step - 1])
        for _ in range(done):
            scheduler.step()
        return optimizer, scheduler

    # -- difficulty ordering ----------------------------------------------------------------------------------------

    def _sorted_easy_to_hard(self, dataset: Dataset) -> Dataset:
        """Sort by the initial model's log-probability margin, largest (easiest) first.

        Examples TRL drops while preparing (fully truncated prompts) have no margin and go last; their trainer drops
        them again."""
        probe_args = copy.deepcopy(self.args)
        probe_args.output_dir = str(self.output_dir / "difficulty")
        probe_args.precompute_ref_log_probs = True
        probe_args.remove_unused_columns = False
        indexed = dataset.add_column(_INDEX_COLUMN, list(range(len(dataset))))
        probe = self.trainer_cls(
            model=copy.deepcopy(self.model),
            args=probe_args,
            train_dataset=indexed,
            processing_class=self.processing_class,
        )
        prepared = probe.train_dataset
        margin = {
            index: chosen - rejected
            for index, chosen, rejected in zip(
                prepared[_INDEX_COLUMN], prepared["ref_chosen_logps"], prepared["ref_rejected_logps"], strict=True
            )
        }
        del probe
        order = sorted(range(len(dataset)), key=lambda i: -margin.get(i, -math.inf))
        return dataset.select(order)
