"""Run the benchmark: every (dataset, trainer kind, gradient checkpointing) cell, variants alternating per round."""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from trl_prefix_share.commands.bench.data import (
    DEFAULT_TOKENIZER,
    dataset_label,
    load_rows,
    sample_rows,
    trainable_rows,
)
from trl_prefix_share.commands.bench.measure import PeakMemory, TokenCountingCollator, measured_train, resolve_device
from trl_prefix_share.commands.bench.models import PRESETS, ModelShape, build_model_dir
from trl_prefix_share.commands.bench.trainers import DEFAULT_VARIANTS, make_trainer
from trl_prefix_share.commands.bench.vision import (
    ImageCounter,
    VisionShape,
    build_vision_model_dir,
    is_vision_dataset,
    qwen_vl_processor,
    vision_rows,
)


@dataclass
class BenchSettings:
    """What to benchmark. Every run of a cell gets the same model, data sample, seed and config."""

    trainers: list[str] = field(default_factory=lambda: ["dpo"])
    datasets: list[str] = field(default_factory=lambda: ["hh_harmless"])
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    tokenizer: str = str(DEFAULT_TOKENIZER)
    model: str | None = None
    shape: ModelShape = PRESETS["tiny"]
    batch_size: int = 8
    steps: int = 4
    warmup: int = 1
    rounds: int = 2
    max_length: int | None = 1024
    gradient_checkpointing: list[bool] = field(default_factory=lambda: [True])
    seed: int = 42
    device: str = "auto"
    whole_file: bool = True
    vision_shape: VisionShape = field(default_factory=VisionShape)
    #: Examples of a generated image set over which the whole-file token limits are counted.
    vision_examples: int = 256

    def model_description(self) -> str:
        if self.model is not None:
            return self.model
        if all(is_vision_dataset(name) for name in self.datasets):
            return self.vision_shape.describe()
        return self.shape.describe()

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


@dataclass
class RunResult:
    """Measurements of one `trainer.train()` run."""

    dataset: str
    kind: str
    variant: str
    gradient_checkpointing: bool
    round: int
    step_seconds: list[float]
    cpu_seconds: list[float]
    tokens_per_step: float
    stock_tokens_per_step: float
    peak_memory_mib: float | None
    setup_seconds: float
    training_memory_mib: float | None = None  # timed steps' peak above the memory after the warm-up
    images_per_step: float | None = None  # images the vision tower encoded per step (policy and reference)


@dataclass
class WholeFileTokens:
    """Token counts over every batch of a data file (collation only): the limits the timed sample estimates."""

    dataset: str
    kind: str
    batches: int
    stock_tokens_per_step: float
    unshared_tokens_per_step: float
    ours_tokens_per_step: float

    @property
    def token_limit(self) -> float:
        return self.stock_tokens_per_step / self.ours_tokens_per_step

    @property
    def unpadded_limit(self) -> float:
        return self.unshared_tokens_per_step / self.ours_tokens_per_step


@dataclass
class BenchReport:
    """Everything measured, plus the environment."""

    settings: BenchSettings
    environment: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)
    whole_file: list[WholeFileTokens] = field(default_factory=list)


def common_config(settings: BenchSettings, output_dir: str, gradient_checkpointing: bool) -> dict[str, Any]:
    """Config fields every run shares: TRL's defaults except steps, batch, device/precision and no reporting."""
    device = settings.resolved_device()
    fields: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=settings.batch_size,
        max_steps=settings.warmup + settings.steps,
        max_length=settings.max_length,
        gradient_checkpointing=gradient_checkpointing,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=settings.seed,
        data_seed=settings.seed,
    )
    if device.type == "cuda":
        fields.update(bf16=True, model_init_kwargs={"dtype": torch.bfloat16})
    else:
        fields.update(use_cpu=True, bf16=False)
    return fields


def run_once(
    settings: BenchSettings,
    kind: str,
    variant: str,
    model: str,
    tokenizer: PreTrainedTokenizerBase,
    data: Dataset,
    label: str,
    gradient_checkpointing: bool,
    round_index: int,
) -> RunResult:
    """Build one trainer, train it, and return its timed steps, tokens and peak memory."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trl-prefix-share-bench-") as output_dir:
        common = common_config(settings, output_dir, gradient_checkpointing)
        trainer = make_trainer(kind, variant, common, model, tokenizer, data)
        setup = time.perf_counter() - started
        images = ImageCounter()
        for watched in (trainer.model, getattr(trainer, "ref_model", None)):
            images.watch(watched)
        measured = measured_train(trainer, PeakMemory(settings.resolved_device()), settings.warmup, settings.steps)
        del trainer
    return RunResult(
        dataset=label,
        kind=kind,
        variant=variant,
        gradient_checkpointing=gradient_checkpointing,
        round=round_index,
        step_seconds=measured.step_seconds,
        cpu_seconds=measured.cpu_seconds,
        tokens_per_step=measured.tokens_per_step,
        stock_tokens_per_step=measured.stock_tokens_per_step,
        peak_memory_mib=measured.peak_memory_mib,
        setup_seconds=setup,
        training_memory_mib=measured.training_memory_mib,
        images_per_step=images.images / (settings.warmup + settings.steps) if images.images else None,
    )


def whole_file_tokens(
    settings: BenchSettings, kind: str, model: str, tokenizer: PreTrainedTokenizerBase, rows: Dataset, label: str
) -> WholeFileTokens:
    """Collate every batch of the file with the shared and the unshared layout (no model step)."""
    counts: dict[str, TokenCountingCollator] = {}
    for variant in ("ours", "unshared"):
        with tempfile.TemporaryDirectory(prefix="trl-prefix-share-bench-") as output_dir:
            trainer = make_trainer(kind, variant, common_config(settings, output_dir, True), model, tokenizer, rows)
            counter = TokenCountingCollator(trainer.data_collator)
            trainer.data_collator = counter
            for _ in trainer.get_train_dataloader():
                pass
            counts[variant] = counter
            del trainer
    batches = len(counts["ours"].ours)
    return WholeFileTokens(
        dataset=label,
        kind=kind,
        batches=batches,
        stock_tokens_per_step=sum(counts["ours"].stock) / batches,
        unshared_tokens_per_step=sum(counts["unshared"].ours) / batches,
        ours_tokens_per_step=sum(counts["ours"].ours) / batches,
    )


def environment(settings: Any) -> dict[str, Any]:
    """Versions and hardware, for the report (of any settings with a ``resolved_device()``)."""
    import transformers
    import trl

    device = settings.resolved_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "dtype": "bf16" if device.type == "cuda" else "fp32",
    }


class RepeatedWarningFilter(logging.Filter):
    """Lets a log message through once per opening: TRL's per-example data warnings (e.g. a prompt that is not a
    token prefix) repeat for every trainer the benchmark builds and differ only in their last words."""

    def __init__(self, opening_chars: int = 80) -> None:
        super().__init__()
        self.opening_chars = opening_chars
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        opening = record.getMessage()[: self.opening_chars]
        if opening in self.seen:
            return False
        self.seen.add(opening)
        return True


#: Loggers of the trainers whose data warnings the benchmark shows once.
QUIETED_LOGGERS = (
    "trl.trainer.dpo_trainer",
    "trl.trainer.reward_trainer",
    "trl.experimental.cpo.cpo_trainer",
    "trl.experimental.orpo.orpo_trainer",
)


def _show_data_warnings_once() -> None:
    for name in QUIETED_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, RepeatedWarningFilter) for f in target.filters):
            target.addFilter(RepeatedWarningFilter())


def run_benchmark(settings: BenchSettings, log: Any = print) -> BenchReport:
    """Run every cell; within a cell the variants alternate round by round so machine drift cancels."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    _show_data_warnings_once()
    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer)
    report = BenchReport(settings, environment(settings))
    dtype = torch.float32
    model_dirs: dict[bool, str] = {}
    processor = None
    for dataset_name in settings.datasets:
        label = dataset_label(dataset_name)
        vision = is_vision_dataset(dataset_name)
        raw = None if vision else load_rows(dataset_name)
        for kind in settings.trainers:
            reward = kind == "reward"
            processing_class = tokenizer
            if vision:
                if kind != "dpo":
                    raise ValueError(f"Image data is benchmarked with `--trainer dpo` only (TRL's {kind} takes none).")
                processor = processor or qwen_vl_processor(settings.tokenizer)
                processing_class = processor
                if settings.model is None and "vision" not in model_dirs:
                    model_dirs["vision"] = build_vision_model_dir(
                        settings.vision_shape, processor, settings.seed, dtype
                    )
                model = settings.model or model_dirs["vision"]
                count = settings.batch_size * (settings.warmup + settings.steps)
                sample = vision_rows(dataset_name, count, settings.seed, settings.vision_shape)
                rows = vision_rows(dataset_name, settings.vision_examples, settings.seed + 1, settings.vision_shape)
            else:
                if settings.model is None and reward not in model_dirs:
                    model_dirs[reward] = build_model_dir(settings.shape, tokenizer, reward, settings.seed, dtype)
                model = settings.model or model_dirs[reward]
                rows = trainable_rows(raw, kind, tokenizer, settings.max_length)
                sample = Dataset.from_list(
                    sample_rows(rows, settings.batch_size * (settings.warmup + settings.steps), settings.seed)
                )
            for checkpointing in settings.gradient_checkpointing:
                for round_index in range(settings.rounds):
                    for variant in settings.variants:
                        result = run_once(
                            settings, kind, variant, model, processing_class, sample, label, checkpointing, round_index
                        )
                        report.runs.append(result)
                        gc.collect()
                        images = "" if result.images_per_step is None else f", {result.images_per_step:.0f} images/step"
                        log(
                            f"  {label} {kind} gc={'on' if checkpointing else 'off'} round {round_index + 1} "
                            f"{variant:>8}: median {statistics.median(result.step_seconds):.3f} s/step, "
                            f"{result.tokens_per_step:.0f} tokens/step{images}"
                        )
            if settings.whole_file:
                whole = rows if vision else Dataset.from_list(rows)
                report.whole_file.append(whole_file_tokens(settings, kind, model, processing_class, whole, label))
    return report
