"""Summaries of a benchmark: ratios to stock per cell, a text table, JSON and a PNG chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trl_prefix_share.commands.bench.runner import BenchReport, RunResult
from trl_prefix_share.commands.bench.trainers import KIND_LABELS, VARIANT_LABELS


@dataclass
class VariantSummary:
    """One variant of one cell (dataset, kind, gradient checkpointing), over all its rounds."""

    dataset: str
    kind: str
    gradient_checkpointing: bool
    variant: str
    median_step_s: float
    mean_step_s: float
    median_cpu_s: float
    tokens_per_step: float
    peak_memory_mib: float | None
    training_memory_mib: float | None  # timed steps' peak above the memory held after the warm-up
    speed_ratio: float | None  # stock median step / this median step
    best_of_rounds_ratio: float | None  # per step index, fastest over rounds, summed: robust to other load
    token_ratio: float | None  # stock tokens / these tokens, on the timed batches
    per_round_speed_ratio: list[float]
    images_per_step: float | None = None  # images the vision tower encoded per step (image data only)


def _best_per_step(runs: list[RunResult]) -> list[float]:
    """Fastest time of each step index over the rounds (step i trains the same batch in every run)."""
    return [min(times) for times in zip(*(r.step_seconds for r in runs), strict=True)]


def summarize(report: BenchReport) -> list[VariantSummary]:
    """Per cell and variant: medians, tokens, memory and the ratios to the cell's stock runs."""
    summaries = []
    cells = dict.fromkeys((r.dataset, r.kind, r.gradient_checkpointing) for r in report.runs)
    for dataset, kind, checkpointing in cells:
        key = (dataset, kind, checkpointing)
        cell = [r for r in report.runs if (r.dataset, r.kind, r.gradient_checkpointing) == key]
        stock = [r for r in cell if r.variant == "stock"]
        stock_median = statistics.median(s for r in stock for s in r.step_seconds) if stock else None
        stock_tokens = statistics.mean(r.stock_tokens_per_step for r in cell)
        for variant in dict.fromkeys(r.variant for r in cell):
            runs = [r for r in cell if r.variant == variant]
            median = statistics.median(s for r in runs for s in r.step_seconds)
            tokens = statistics.mean(r.tokens_per_step for r in runs)
            peaks = [r.peak_memory_mib for r in runs if r.peak_memory_mib is not None]
            growths = [r.training_memory_mib for r in runs if r.training_memory_mib is not None]
            per_round = []
            if stock:
                per_round = [
                    statistics.median(s.step_seconds) / statistics.median(o.step_seconds)
                    for s, o in zip(stock, runs, strict=False)
                ]
            summaries.append(
                VariantSummary(
                    dataset=dataset,
                    kind=kind,
                    gradient_checkpointing=checkpointing,
                    variant=variant,
                    median_step_s=median,
                    mean_step_s=statistics.mean(s for r in runs for s in r.step_seconds),
                    median_cpu_s=statistics.median(s for r in runs for s in r.cpu_seconds),
                    tokens_per_step=tokens,
                    peak_memory_mib=max(peaks) if peaks else None,
                    training_memory_mib=max(growths) if growths else None,
                    speed_ratio=stock_median / median if stock else None,
                    best_of_rounds_ratio=sum(_best_per_step(stock)) / sum(_best_per_step(runs)) if stock else None,
                    token_ratio=stock_tokens / tokens,
                    per_round_speed_ratio=per_round,
                    images_per_step=runs[0].images_per_step,
                )
            )
    return summaries


def sharing_alone(report: BenchReport, cell: tuple[str, str, bool]) -> tuple[float, float, float]:
    """Prefix sharing on its own in one cell: packed-unshared over ours as (median step ratio, best-of-rounds step
    ratio, token ratio); the first two over the third is the share of the unpadded limit reached."""
    runs = [r for r in report.runs if (r.dataset, r.kind, r.gradient_checkpointing) == cell]
    unshared = [r for r in runs if r.variant == "unshared"]
    ours = [r for r in runs if r.variant == "ours"]
    median = statistics.median(s for r in unshared for s in r.step_seconds) / statistics.median(
        s for r in ours for s in r.step_seconds
    )
    best = sum(_best_per_step(unshared)) / sum(_best_per_step(ours))
    tokens = statistics.mean(r.tokens_per_step for r in unshared) / statistics.mean(r.tokens_per_step for r in ours)
    return median, best, tokens


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(report: BenchReport, summaries: list[VariantSummary]) -> str:
    """A text table per cell, then the whole-file token limits and the two targets' figures."""
    lines = []
    for dataset, kind, checkpointing in dict.fromkeys((s.dataset, s.kind, s.gradient_checkpointing) for s in summaries):
        cell = [s for s in summaries if (s.dataset, s.kind, s.gradient_checkpointing) == (dataset, kind, checkpointing)]
        lines.append(f"\n{dataset} / {KIND_LABELS[kind]} / gradient checkpointing {'on' if checkpointing else 'off'}")
        lines.append(
            f"{'variant':<18}{'median s/step':>14}{'cpu s/step':>12}{'tokens/step':>13}{'peak MiB':>10}{'+MiB':>8}"
            f"{'speed':>9}{'best/rnd':>10}{'tokens':>9}{'share of limit':>16}"
        )
        by_variant = {s.variant: s for s in cell}
        for s in cell:
            peak = "-" if s.peak_memory_mib is None else f"{s.peak_memory_mib:.0f}"
            growth = "-" if s.training_memory_mib is None else f"{s.training_memory_mib:.0f}"
            share = "-" if s.speed_ratio is None or s.variant == "stock" else f"{s.speed_ratio / s.token_ratio:.2f}"
            lines.append(
                f"{VARIANT_LABELS[s.variant]:<18}{s.median_step_s:>14.3f}{s.median_cpu_s:>12.3f}"
                f"{s.tokens_per_step:>13.0f}{peak:>10}{growth:>8}{_ratio(s.speed_ratio):>9}{_ratio(s.best_of_rounds_ratio):>10}"
                f"{_ratio(s.token_ratio):>9}{share:>16}"
                + ("" if s.images_per_step is None else f"   {s.images_per_step:.0f} images encoded/step")
            )
        if "ours" in by_variant and "unshared" in by_variant:
            alone, best, limit = sharing_alone(report, (dataset, kind, checkpointing))
            lines.append(
                f"sharing alone (packed unshared / ours): {alone:.2f}x speed (best of rounds {best:.2f}x), "
                f"{limit:.2f}x tokens: {alone / limit:.2f} ({best / limit:.2f}) of the unpadded limit"
            )
    if summaries:
        lines.append(
            "peak MiB: the timed steps' CUDA allocator peak, or CPU peak resident set (weights and optimizer state "
            "included); +MiB: that peak above the memory held after the warm-up (activations and gradients)"
        )
    for whole in report.whole_file:
        lines.append(
            f"\nwhole file {whole.dataset} / {KIND_LABELS[whole.kind]} ({whole.batches} batches): tokens/step stock "
            f"{whole.stock_tokens_per_step:.0f}, packed unshared {whole.unshared_tokens_per_step:.0f}, ours "
            f"{whole.ours_tokens_per_step:.0f}; token limit {whole.token_limit:.2f}x, unpadded limit "
            f"{whole.unpadded_limit:.2f}x"
        )
    return "\n".join(lines)


def to_json(report: BenchReport, summaries: list[VariantSummary]) -> dict[str, Any]:
    """Everything, JSON-ready."""
    whole = [{**asdict(w), "token_limit": w.token_limit, "unpadded_limit": w.unpadded_limit} for w in report.whole_file]
    return {
        "settings": asdict(report.settings),
        "environment": report.environment,
        "summaries": [asdict(s) for s in summaries],
        "whole_file": whole,
        "runs": [asdict(r) for r in report.runs],
    }


def write_json(report: BenchReport, summaries: list[VariantSummary], path: Path) -> None:
    path.write_text(json.dumps(to_json(report, summaries), indent=2))


def plot(report: BenchReport, summaries: list[VariantSummary], path: Path) -> None:
    """Grouped bars: median step time per cell and variant, annotated with the speed ratio to stock; the token
    ratio of each variant as a marker on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys((s.dataset, s.kind, s.gradient_checkpointing) for s in summaries))
    variants = list(dict.fromkeys(s.variant for s in summaries))
    width = 0.8 / len(variants)
    figure, axis = plt.subplots(figsize=(2.4 * len(cells) + 2.5, 4.4))
    for index, variant in enumerate(variants):
        values, labels = [], []
        for cell in cells:
            match = [s for s in summaries if (s.dataset, s.kind, s.gradient_checkpointing) == cell]
            found = next((s for s in match if s.variant == variant), None)
            values.append(found.median_step_s if found else 0.0)
            labels.append("" if found is None or found.speed_ratio is None else f"{found.speed_ratio:.2f}x")
        xs = [i + (index - (len(variants) - 1) / 2) * width for i in range(len(cells))]
        bars = axis.bar(xs, values, width, label=VARIANT_LABELS[variant])
        if variant != "stock":
            for bar, text in zip(bars, labels, strict=True):
                axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", fontsize=7)
    names = [f"{d}\n{KIND_LABELS[k]}{'' if g else ' (no gc)'}" for d, k, g in cells]
    axis.set_xticks(range(len(cells)), names, fontsize=8)
    axis.set_ylabel("median train step (s)")
    env = report.environment
    settings = report.settings
    model = settings.model_description()
    axis.set_title(
        f"train() step time; labels: speed-up vs stock TRL\n{model}, batch {settings.batch_size}, {env['dtype']}, "
        f"{env['device']}, trl {env['trl']}",
        fontsize=9,
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
