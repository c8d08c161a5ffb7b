"""Timing, token and memory measurements of one `trainer.train()` run."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from trl_prefix_share.core.packing import PACKED_KEY

_STATUS = Path("/proc/self/status")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; any other name as torch spells it (``cpu``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def stock_batch_tokens(batch: dict[str, Any]) -> int:
    """Tokens of the padded batch stock TRL runs: ``[chosen; rejected]`` stacked to the longer width."""
    if "chosen_input_ids" in batch:  # ORPO / CPO: chosen and rejected are padded separately, then stacked
        width = max(batch["chosen_input_ids"].size(1), batch["rejected_input_ids"].size(1))
        return 2 * batch["chosen_input_ids"].size(0) * width
    return int(batch["input_ids"].numel())


def packed_batch_tokens(batch: dict[str, Any]) -> int:
    """Tokens of our packed rows (the stock count when the batch has no packed layout)."""
    packed = batch.get(PACKED_KEY)
    return stock_batch_tokens(batch) if packed is None else int(packed["input_ids"].numel())


class TokenCountingCollator:
    """Wraps a trainer's collator; records, per batch in collation order, stock's and our token counts."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator
        self.stock: list[int] = []
        self.ours: list[int] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        self.stock.append(stock_batch_tokens(batch))
        self.ours.append(packed_batch_tokens(batch))
        return batch


def _return_freed_memory() -> None:
    """Ask glibc to hand freed heap memory back to the OS, so an earlier run's memory is not counted in this one's
    resident peak (no-op where glibc is not the allocator)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class AllocationPeak:
    """Exact peak of the bytes torch holds on the CPU over an interval, from the allocator's own events.

    The resident-set peak (VmHWM) counts allocator slack and pages glibc has not handed back, which is not linear in
    tokens; this counts every torch allocation and free (the profiler's memory events: ``nbytes`` is positive for an
    allocation, negative for a free) and returns the highest running total above the start, the CPU counterpart of
    CUDA's ``max_memory_allocated``. Memory outside torch's allocator (numpy, the tokenizer) is not in it."""

    def __init__(self) -> None:
        self._profiler: Any = None
        self.peak_bytes: int | None = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.stop()
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()

    def stop(self) -> int | None:
        """End the interval (idempotent); the peak in bytes above the start, or None when none was started."""
        if self._profiler is None:
            return self.peak_bytes
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        running = np.cumsum([e.nbytes() for e in events]) if events else np.zeros(1, dtype=np.int64)
        self.peak_bytes = max(int(running.max()), 0)
        return self.peak_bytes


class PeakMemory:
    """Peak memory of the timed steps: CUDA's allocator peak, or on Linux the process's peak resident set.

    ``reset`` is called after the warm-up steps. On CPU it first hands freed heap memory back to the OS and resets the
    kernel's high-water mark (VmHWM, ``/proc/self/clear_refs``), so the peak is the timed steps', not the process's.
    The peak includes weights and optimizer state, the same for every variant. ``growth_mib`` is the peak above the
    memory held at the reset, when weights, optimizer state and buffers are in place: what the timed steps'
    activations and gradients add, the part that scales with the tokens a step runs. With ``torch_allocations`` the
    CPU growth is torch's exact allocation peak (`AllocationPeak`) instead of the resident set's; ``finish`` (called
    at the end of training) closes that interval."""

    def __init__(self, device: torch.device, torch_allocations: bool = False) -> None:
        self.device = device
        self.start_mib: float | None = None
        self.allocations = AllocationPeak() if torch_allocations and device.type != "cuda" else None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            _return_freed_memory()
            self.start_mib = _status_mib("VmRSS")  # read first: the reset mark then holds at least this much
            with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak is then the process's
                Path("/proc/self/clear_refs").write_text("5")
            if self.allocations is not None:
                self.allocations.start()

    def finish(self) -> None:
        if self.allocations is not None:
            self.allocations.stop()

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _status_mib("VmHWM")

    def growth_mib(self) -> float | None:
        if self.allocations is not None:
            peak = self.allocations.stop()
            return None if peak is None else peak / 2**20
        peak = self.peak_mib()
        return None if peak is None or self.start_mib is None else peak - self.start_mib


def _status_mib(field: str) -> float | None:
    """A memory figure of this process from ``/proc/self/status`` (Linux), in MiB."""
    if not _STATUS.exists():
        return None
    match = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text())
    return int(match.group(1)) / 1024 if match else None


class StepTimer(TrainerCallback):
    """Wall and CPU time at the end of every optimizer step; resets the memory peak after the warm-up steps (inside
    the last warm-up step's interval, so the reset is not timed).

    With ``memory_after`` (a number of timed steps) the memory is measured on the steps after those instead: the
    reset comes at the end of the last timed step. Counting torch's allocations (`AllocationPeak`) runs the profiler,
    whose per-operator cost would otherwise be timed too (about 5 % of a short step of many small operators)."""

    def __init__(self, memory: PeakMemory, warmup: int = 1, memory_after: int | None = None) -> None:
        self.memory = memory
        self.warmup = warmup
        self.memory_after = memory_after
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.memory_after is None:  # superseded after the warm-up; so that a run without warm-up has a start
            self.memory.reset()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.memory.device.type == "cuda":
            torch.cuda.synchronize(self.memory.device)
        if self.memory_after is None and len(self.wall) + 1 == self.warmup:
            self.memory.reset()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if self.memory_after is not None and len(self.wall) == self.warmup + self.memory_after:
            self.memory.reset()  # after the mark: the memory steps are not timed

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.memory.finish()


def intervals(marks: list[float], warmup: int) -> list[float]:
    """Durations of the steps after the first ``warmup`` ones, from consecutive end-of-step marks."""
    return [b - a for a, b in zip(marks[warmup - 1 : -1], marks[warmup:], strict=True)]


@dataclass
class TrainMeasurement:
    """Timed steps, tokens per timed batch and peak memory of one `trainer.train()` run."""

    step_seconds: list[float]
    cpu_seconds: list[float]
    tokens_per_step: float
    stock_tokens_per_step: float
    peak_memory_mib: float | None
    training_memory_mib: float | None  # timed steps' peak above the memory held after the warm-up


def measured_train(trainer: Any, memory: PeakMemory, warmup: int, steps: int) -> TrainMeasurement:
    """Run ``trainer.train()`` (configured for ``warmup + steps`` steps) without progress output, timing every step
    and counting the tokens of the timed batches: the instrumentation a benchmark script would otherwise copy."""
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    counter = TokenCountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    timer = StepTimer(memory, warmup)
    trainer.add_callback(timer)
    trainer.train()
    expected = warmup + steps
    if len(timer.wall) != expected:
        raise RuntimeError(f"expected {expected} steps, got {len(timer.wall)}")
    # The data loader may collate ahead: the trained batches are the first ones collated, in order.
    timed = slice(warmup, expected)
    return TrainMeasurement(
        step_seconds=intervals(timer.wall, warmup),
        cpu_seconds=intervals(timer.cpu, warmup),
        tokens_per_step=statistics.mean(counter.ours[timed]),
        stock_tokens_per_step=statistics.mean(counter.stock[timed]),
        peak_memory_mib=memory.peak_mib(),
        training_memory_mib=memory.growth_mib(),
    )


def alternating_rounds(
    names: Sequence[str], rounds: int, run: Callable[[str], TrainMeasurement]
) -> dict[str, list[TrainMeasurement]]:
    """``run(name)`` for every name once per round, round after round, so that machine drift falls on every variant
    alike; one line per run (median step, tokens, peak). The loop every special-case script in `benchmarks/` runs."""
    runs: dict[str, list[TrainMeasurement]] = {name: [] for name in names}
    width = max(map(len, names))
    for round_index in range(rounds):
        for name in names:
            result = run(name)
            runs[name].append(result)
            gc.collect()
            peak = "-" if result.peak_memory_mib is None else f"{result.peak_memory_mib:.0f} MiB"
            print(
                f"  round {round_index + 1} {name:>{width}}: median {statistics.median(result.step_seconds):.3f} "
                f"s/step, {result.tokens_per_step:.0f} tokens/step, peak {peak}",
                flush=True,
            )
    return runs
