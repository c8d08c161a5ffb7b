"""The text report `trl-prefix-share estimate` prints."""

from __future__ import annotations

from collections.abc import Sequence

from trl_prefix_share.commands.estimate.memory import memory_lines
from trl_prefix_share.commands.estimate.results import LengthStats, SavingsEstimate
from trl_prefix_share.commands.estimate.work import compute_lines

SPEEDUP_NOTE = (
    "The token ratio is the saving in the model body. End to end, small models on CPU gained more than it in our\n"
    "benchmarks (stock TRL also runs its LM head over every padded position, ours over scored ones only); large\n"
    "models and GPUs should expect it or less (fixed per-step costs). The lower figure is prompt sharing alone,\n"
    "against a padding-free baseline (stock TRL 1.16 has none for DPO). Measured figures: docs/benchmarks.md."
)


def _format_lengths(estimate: SavingsEstimate) -> list[str]:
    lines = [f"{'tokens per pair':<24}{'mean':>9}{'median':>9}{'p95':>9}{'max':>9}   (before truncation)"]
    for name in ("prompt", "chosen", "rejected"):
        stats: LengthStats = getattr(estimate, name)
        lines.append(f"  {name:<22}{stats.mean:>9.1f}{stats.median:>9.0f}{stats.p95:>9.0f}{stats.max:>9,}")
    lines.append(f"  prompt share of the unpadded tokens: {estimate.prompt_share:.0%}")
    return lines


def _format_counts(estimates: Sequence[SavingsEstimate]) -> list[str]:
    header = (
        f"{'batch':>5}{'batches':>9}{'stock TRL':>15}{'unpadded':>15}{'prefix-shared':>15}"
        f"{'stock/ours':>12}{'one-level':>11}{'batch mean':>12}{'unpadded/ours':>15}   expected speedup"
    )
    lines = [header]
    for e in estimates:
        low, high = e.speedup_range
        lines.append(
            f"{e.batch_size:>5}{e.batches:>9,}{e.stock_tokens:>15,}{e.unpadded_tokens:>15,}{e.tokens:>15,}"
            f"{e.token_ratio:>11.2f}x{e.one_level_ratio:>10.2f}x{e.mean_batch_ratio:>11.2f}x{e.sharing_ratio:>14.2f}x"
            f"   {low:.2f}x - {high:.2f}x"
        )
    return lines


def _format_notes(estimate: SavingsEstimate) -> list[str]:
    notes = []
    if estimate.dropped:
        notes.append(f"{estimate.dropped:,} pair(s) dropped, as TRL does: the prompt alone fills max_length")
    if estimate.truncated:
        notes.append(f"{estimate.truncated:,} pair(s) truncated at max_length={estimate.max_length}")
    if estimate.identical:
        notes.append(f"{estimate.identical:,} pair(s) with identical chosen and rejected: laid out once")
    if estimate.empty_responses:
        notes.append(
            f"{estimate.empty_responses:,} pair(s) with an empty response: prefix sharing refuses them unless "
            "drop_invalid_examples=True (they are counted above)"
        )
    return [f"  - {note}" for note in notes]


def format_report(estimates: Sequence[SavingsEstimate], title: str) -> str:
    """The table `trl-prefix-share estimate` prints (one row of counts per batch size)."""
    first = estimates[0]
    kind = ("conversational" if first.conversational else "plain text") + (
        ", implicit prompt" if first.implicit_prompt else ""
    )
    order = f"shuffled with seed {first.seed}" if first.shuffle else "in dataset order"
    if first.group_by_prompt:
        order = f"stock {order}, ours grouped by prompt (seed {first.seed})"
    truncation = "no truncation" if first.max_length is None else f"max_length {first.max_length}"
    if first.max_length is not None and first.truncation_mode != "keep_start":
        truncation += f" ({first.truncation_mode})"
    for name in ("pad_to_multiple_of", "max_row_tokens", "pad_rows_to_multiple_of"):
        if getattr(first, name) is not None:
            truncation += f", {name} {getattr(first, name)}"
    lines = [
        f"{title}",
        f"{first.examples:,} pairs ({kind}); {truncation}; batches {order}",
        "",
        *_format_lengths(first),
        "",
        "tokens in one epoch (stock TRL: padded [2B, L] batches; unpadded: prompt twice; prefix-shared: ours, prefix",
        "trees; one-level: stock/ours when only a pair's own prompt is shared)",
        *_format_counts(estimates),
        *memory_lines([(e.batch_size, e.memory) for e in estimates]),
        *compute_lines([(e.batch_size, e.compute_limit) for e in estimates]),
        "",
        SPEEDUP_NOTE,
    ]
    notes = _format_notes(first)
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)
