"""`trl-prefix-share bench`: every variant of the ablation runs, the token bookkeeping is consistent across variants,
and the command writes its table, JSON and chart. (Speed itself is measured by running the command, never here.)"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import TOKENIZER_DIR, load_dataset_rows
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from trl_prefix_share.commands.bench import BenchSettings, run_benchmark
from trl_prefix_share.commands.bench.command import build_parser, shape_from
from trl_prefix_share.commands.bench.models import PRESETS, ModelShape, build_model_dir
from trl_prefix_share.commands.bench.report import format_table, sharing_alone, summarize
from trl_prefix_share.commands.bench.runner import BenchReport, RepeatedWarningFilter, RunResult
from trl_prefix_share.commands.cli import main

TINY = ModelShape(family="qwen2", layers=2, hidden=32, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-data") / "hh_sample.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in load_dataset_rows("hh_harmless", 16)))
    return path


def test_ablation_variants_see_the_same_batches(small_file):
    settings = BenchSettings(
        trainers=["reward"],
        datasets=[str(small_file)],
        tokenizer=str(TOKENIZER_DIR),
        shape=TINY,
        batch_size=4,
        steps=2,
        warmup=1,
        rounds=1,
    )
    report = run_benchmark(settings, log=lambda line: None)
    runs = {run.variant: run for run in report.runs}
    assert set(runs) == {"stock", "unshared", "unpacked", "ours"}
    stock_tokens = runs["stock"].tokens_per_step
    # Every variant of ours saw stock's batches: its view of stock's padded tokens equals stock's own count.
    assert all(run.stock_tokens_per_step == stock_tokens for run in report.runs)
    assert runs["ours"].tokens_per_step < runs["unshared"].tokens_per_step < stock_tokens
    assert runs["ours"].tokens_per_step < runs["unpacked"].tokens_per_step
    assert all(len(run.step_seconds) == 2 and min(run.step_seconds) > 0 for run in report.runs)
    assert all(0 <= run.training_memory_mib < run.peak_memory_mib for run in report.runs)
    (whole,) = report.whole_file
    assert whole.batches == 4 and whole.token_limit > whole.unpadded_limit > 1
    summaries = {s.variant: s for s in summarize(report)}
    assert summaries["stock"].speed_ratio == 1.0
    assert summaries["ours"].token_ratio == pytest.approx(stock_tokens / runs["ours"].tokens_per_step)


def test_bench_command_writes_table_json_and_chart(small_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    main(
        [
            "bench",
            "--trainer",
            "simpo",
            "--dataset",
            str(small_file),
            "--tokenizer",
            str(TOKENIZER_DIR),
            "--family",
            "llama",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--variants",
            "stock",
            "ours",
            "--batch-size",
            "4",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--no-whole-file",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    printed = capsys.readouterr().out
    assert "hh_sample / SimPO" in printed and "shared + packed" in printed
    payload = json.loads(out_json.read_text())
    variants = {s["variant"]: s for s in payload["summaries"]}
    assert set(variants) == {"stock", "ours"} and variants["ours"]["token_ratio"] > 1
    assert payload["environment"]["trl"].startswith("1.16")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_presets_build_their_published_shape(tmp_path):
    """Every preset holds the published config's sizes (written out here from the hub's config.json files, not read
    from the presets), and a shape's sizes and tied embeddings reach the model built from it."""
    # (layers, hidden, heads, kv heads, MLP, tied) of the published config.json files on the hub
    published = {
        "smollm-135m": (30, 576, 9, 3, 1536, True),
        "qwen2.5-0.5b": (24, 896, 14, 2, 4864, True),
        "qwen2.5-1.5b": (28, 1536, 12, 2, 8960, True),
    }
    for name, sizes in published.items():
        shape = shape_from(build_parser().parse_args(["--model-preset", name]))
        assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.intermediate, shape.tie_embeddings) == (
            sizes
        ), name
    assert "tied embeddings" in PRESETS["smollm-135m"].describe()
    small = ModelShape("llama", layers=1, hidden=24, heads=3, kv_heads=1, intermediate=48, tie_embeddings=True)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    path = build_model_dir(small, tokenizer, reward=False, seed=0, dtype=torch.float32)
    config = AutoConfig.from_pretrained(path)
    assert (config.num_key_value_heads, config.intermediate_size, config.tie_word_embeddings) == (1, 48, True)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_repeated_data_warnings_are_shown_once():
    """TRL words a per-example warning differently for each example; the benchmark shows its first one only."""
    warning = "The tokenized prompt is not a prefix of the tokenized prompt+completion, usually because the chat "

    def record(tail: str) -> logging.LogRecord:
        return logging.LogRecord("trl", logging.WARNING, __file__, 1, warning + tail, None, None)

    repeated = RepeatedWarningFilter()
    assert [repeated.filter(record(tail)) for tail in ("' H'", "' S'", "' H'")] == [True, False, False]
    assert repeated.filter(logging.LogRecord("trl", logging.WARNING, __file__, 1, "another warning", None, None))


def test_sharing_alone_uses_median_and_best_of_rounds():
    """The target figure of the ablation: a slow outlier step in one round moves the median ratio but not the
    best-of-rounds one (per step index, the fastest round)."""

    def run(variant: str, round_index: int, seconds: list[float], tokens: float) -> RunResult:
        return RunResult("data", "dpo", variant, True, round_index, seconds, seconds, tokens, 3000.0, None, 0.0)

    report = BenchReport(BenchSettings(variants=["unshared", "ours"]), environment={})
    report.runs = [
        run("unshared", 0, [9.0, 3.0], 1500.0),  # first step slowed by other load in round 0
        run("ours", 0, [2.0, 2.0], 1000.0),
        run("unshared", 1, [3.0, 3.0], 1500.0),
        run("ours", 1, [2.0, 2.0], 1000.0),
    ]
    median, best, tokens = sharing_alone(report, ("data", "dpo", True))
    assert (median, best, tokens) == (1.5, 1.5, 1.5)
    report.runs[2] = run("unshared", 1, [3.0, 9.0], 1500.0)  # and the second step in round 1
    median, best, _ = sharing_alone(report, ("data", "dpo", True))
    assert median == 3.0 and best == 1.5
    table = format_table(report, summarize(report))
    assert "3.00x speed (best of rounds 1.50x), 1.50x tokens: 2.00 (1.00) of the unpadded limit" in table


def test_online_bench_splits_steps_with_trl_profiling(tmp_path, capsys):
    """`bench --trainer grpo rloo`: both trainers, stock and ours alternate, each timed step is split into
    generation, rewards and the training side (TRL's profiling), and the token limit comes from our trainer."""
    out = tmp_path / "online.json"
    main(
        [
            "bench",
            "--trainer",
            "grpo",
            "rloo",
            "--model-preset",
            "tiny",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--dataset",
            "pandalm-short",
            "--num-generations",
            "2",
            "--prompts-per-step",
            "2",
            "--max-completion-length",
            "4",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--json",
            str(out),
        ]
    )
    assert "token limit" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert [(r["kind"], r["variant"]) for r in payload["runs"]] == [
        ("grpo", "stock"),
        ("grpo", "ours"),
        ("rloo", "stock"),
        ("rloo", "ours"),
    ]
    for run in payload["runs"]:
        assert len(run["step_seconds"]) == 1 and run["generation_seconds"][0] > 0
        assert 0 < run["training_seconds"][0] < run["step_seconds"][0]
    ours = [r for r in payload["runs"] if r["variant"] == "ours"]
    assert all(r["stock_tokens"] > r["tokens"] > 0 for r in ours)
    assert {c["kind"] for c in payload["summary"]} == {"grpo", "rloo"}
    with pytest.raises(SystemExit):
        main(["bench", "--trainer", "grpo", "dpo"])  # online and preference kinds run separately
