"""`bench --sweep`: the prompt-length x completions grid runs every variant of every cell, reports cells that go over
the time cap (and skips the longer prompts of that variant) instead of dropping them, and its token counts agree
with the layout and with the estimator's prediction."""

from __future__ import annotations

import json

import pytest
from conftest import TOKENIZER_DIR

from trl_prefix_share.commands.bench.models import ModelShape
from trl_prefix_share.commands.bench.sweep import (
    OK,
    OVER_TIME_CAP,
    SKIPPED,
    FixedRollouts,
    SweepSettings,
    TextStream,
    cell_texts,
    dpo_rows,
    run_sweep,
)
from trl_prefix_share.commands.cli import main

TINY = ModelShape(family="llama", layers=1, hidden=32, heads=4, kv_heads=2)


def one_step_settings(**fields) -> SweepSettings:
    """The tests' sweep: on the CPU, one warm-up and one timed step per run, no time cap."""
    return SweepSettings(tokenizer=str(TOKENIZER_DIR), steps=1, warmup=1, time_cap_s=None, device="cpu", **fields)


def test_cells_are_real_text_of_the_asked_lengths(tokenizer):
    settings = SweepSettings(completion_length=12, steps=1, warmup=1)
    stream = TextStream(tokenizer, needed_tokens=2000)
    texts = cell_texts(settings, tokenizer, 100, 4, stream)
    assert len(texts) == 3 and all(len(responses) == 4 for _, responses in texts)  # warm-up, timed, memory steps
    for prompt, responses in texts:
        assert abs(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 100) <= 3
        assert len(set(responses)) == 4  # every completion another stretch of text
    rows = dpo_rows(texts)
    assert len(rows) == 6 and rows[0]["chosen"] == texts[0][1][0] and rows[1]["rejected"] == texts[0][1][3]
    rollouts = FixedRollouts(texts, tokenizer)([texts[0][0]] * 4, trainer=None)
    decoded = [tokenizer.decode(ids) for ids in rollouts["completion_ids"]]
    assert decoded == texts[0][1] and rollouts["logprobs"] is None


@pytest.mark.parametrize(("kind", "lengths", "completions"), [("dpo", [64], [2, 4]), ("grpo", [48, 96], [4])])
def test_sweep_measures_every_variant_and_the_estimate_predicts_the_tokens(kind, lengths, completions, tokenizer):
    settings = one_step_settings(
        kinds=[kind],
        prompt_lengths=lengths,
        completions=completions,
        completion_length=8,
        shape=TINY,
        gradient_checkpointing=False,
    )
    result = run_sweep(settings, log=lambda line: None)
    assert len(result["cells"]) == 2 and len(result["runs"]) == 6
    assert all(run.status == OK and len(run.step_seconds) == 1 for run in result["runs"])
    for cell in result["cells"]:
        n, length = cell["completions"], cell["prompt_length"]
        # one prompt of ~L tokens and n completions of ~8: stock runs it n times, ours once
        expected = n * (length + 8) / (length + n * 8)
        assert cell["token_limit"] == pytest.approx(expected, rel=0.15), cell
        assert cell["token_limit"] > 1.3 and cell["unpadded_limit"] > 1.3
        # the LM head scores every completion token in both layouts: the compute limit is below the token one
        assert 1 < cell["compute_limit"] < cell["unpadded_limit"]
        if cell["predicted_token_ratio"] is not None:
            assert abs(cell["prediction_error"]) < 0.1, cell
    predicted = [c for c in result["cells"] if c["predicted_token_ratio"] is not None]
    assert len(predicted) == 2  # every cell: DPO's n/2 pairs per prompt through `estimate --group-by-prompt`


def test_time_cap_is_reported_and_longer_prompts_skipped(tmp_path, capsys):
    out, chart = tmp_path / "sweep.json", tmp_path / "sweep.png"
    argv = ["bench", "--sweep", "--trainer", "dpo", "--model-preset", "tiny", "--layers", "1", "--hidden", "32"]
    argv += ["--prompt-lengths", "32", "64", "--completions", "2", "--completion-length", "8", "--steps", "2"]
    main([*argv, "--time-cap", "0", "--gradient-checkpointing", "off", "--json", str(out), "--plot", str(chart)])
    printed = capsys.readouterr().out
    assert "token limit" in printed and chart.stat().st_size > 0
    payload = json.loads(out.read_text())
    first, second = payload["cells"]
    assert set(first["status"].values()) == {OVER_TIME_CAP}  # stopped after the warm-up step: reported, not dropped
    assert set(second["status"].values()) == {SKIPPED}
    assert first["speedup"] is None and first["token_limit"] is None
    with pytest.raises(SystemExit):
        main(["bench", "--sweep", "--trainer", "dpo", "--completions", "3"])  # DPO needs pairs


def test_allocation_peak_counts_what_torch_holds_at_its_highest():
    import torch

    from trl_prefix_share.commands.bench.measure import AllocationPeak

    peak = AllocationPeak()
    kept = torch.ones(1)
    peak.start()
    del kept  # freed inside the interval: below the start, not above it
    big = torch.zeros(1 << 20)  # 4 MiB, freed before the end
    small = torch.zeros(1 << 18)  # 1 MiB, alive at the peak
    del big, small
    assert peak.stop() == pytest.approx(5 * 2**20, rel=0.01)
    assert peak.stop() == pytest.approx(5 * 2**20, rel=0.01)  # idempotent


@pytest.mark.parametrize(
    ("kind", "family", "completions"), [("dpo", "llama", [2, 6]), ("grpo", "qwen2", [4])], ids=["dpo", "grpo"]
)
def test_memory_prediction_matches_torchs_exact_peaks(kind, family, completions, tokenizer):
    """The estimator's peak-memory prediction against torch's allocation peaks of stock TRL and of ours, on a small
    model of two families with gradient checkpointing (the setting it models)."""
    settings = one_step_settings(
        kinds=[kind],
        prompt_lengths=[96],
        completions=completions,
        completion_length=16,
        shape=ModelShape(family=family, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=160),
        variants=["stock", "ours"],
    )
    result = run_sweep(settings, log=lambda line: None)
    for cell in result["cells"]:
        assert cell["predicted_memory_stock_mib"] > cell["predicted_memory_ours_mib"] > 0, cell
        for key in ("memory_prediction_error_stock", "memory_prediction_error_ours", "memory_prediction_error"):
            assert abs(cell[key]) < 0.1, (key, cell)


def test_memory_is_counted_after_the_timed_steps():
    """Counting torch's allocations runs the profiler: the sweep starts it after the last timed step (its mark
    taken first), so no timed step pays for it; without ``memory_after`` the reset ends the warm-up as before."""
    import torch

    from trl_prefix_share.commands.bench.measure import StepTimer

    class Recorder:
        device = torch.device("cpu")

        def __init__(self):
            self.resets: list[int] = []

        def reset(self):
            self.resets.append(len(timer.wall))

        def finish(self):
            pass

    for memory_after, expected in ((2, [3]), (None, [0, 0])):
        memory = Recorder()
        timer = StepTimer(memory, warmup=1, memory_after=memory_after)
        timer.on_train_begin(None, None, None)
        for _ in range(4):
            timer.on_step_end(None, None, None)
        assert memory.resets == expected, memory_after


def test_memory_prediction_models_a_gated_delta_layer(tokenizer):
    """On a hybrid, ours' peak at a long prompt is the recomputed gated-delta layer's backward, which holds more per
    token than a dense layer: the prediction counts it (within 10 % of torch's peak), and without that term it would
    be far below the peak (so the term is what makes it hold). The Mamba2 mixers of another hybrid are named as not
    modelled instead of getting a dense layer's figure silently."""
    import dataclasses

    import torch

    from trl_prefix_share.commands.bench.models import build_model_dir
    from trl_prefix_share.commands.bench.sweep import cell_prediction
    from trl_prefix_share.commands.estimate.memory import MemoryEstimate, ModelSizes

    linear = (("linear_num_key_heads", 2), ("linear_num_value_heads", 4))
    heads = (("head_dim", 16), *linear, ("linear_key_head_dim", 16), ("linear_value_head_dim", 32))
    shape = ModelShape("qwen3_5_text", 2, 64, 4, 2, 160, tie_embeddings=True, extra_config=heads)
    model = build_model_dir(shape, tokenizer, False, 42, torch.float32, max_positions=4096 + 128)
    settings = one_step_settings(
        kinds=["grpo"],
        prompt_lengths=[4096],
        completions=[2],
        completion_length=16,
        model=model,
        variants=["ours"],
    )
    result = run_sweep(settings, log=lambda line: None)
    (cell,), (run,) = result["cells"], result["runs"]
    measured = run.training_memory_mib
    assert abs(cell["predicted_memory_ours_mib"] / measured - 1) < 0.1, (cell["predicted_memory_ours_mib"], measured)

    sizes = ModelSizes.from_pretrained(model)
    assert sizes.gated_delta == (2, 4, 16, 32) and sizes.unmodelled_mixers == ()
    stream = TextStream(tokenizer, needed_tokens=4096 * 4 + 2 * 16 * 4)
    texts = cell_texts(settings, tokenizer, 4096, 2, stream)
    _, dense = cell_prediction(settings, "grpo", tokenizer, texts, dataclasses.replace(sizes, gated_delta=None))
    assert dense.ours_mib < 0.8 * measured, (dense.ours_mib, measured)

    mamba = ModelShape("nemotron_h", 2, 64, 4, 2, 160, extra_config=(("layers_block_type", ["mamba", "attention"]),))
    mamba_sizes = ModelSizes.from_pretrained(build_model_dir(mamba, tokenizer, False, 42, torch.float32))
    assert mamba_sizes.gated_delta is None and mamba_sizes.unmodelled_mixers
    estimate = MemoryEstimate(1.0, 1.0, "layer", "layer", mamba_sizes)
    assert all(name in estimate.assumptions for name in mamba_sizes.unmodelled_mixers)
    assert "not modelled" in estimate.assumptions
