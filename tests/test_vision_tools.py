"""The vision tooling: the generated image preference set, `estimate` with a processor, and `bench` on images."""

from __future__ import annotations

import json

import pytest
from vision_setup import build_vision_model

from trl_prefix_share.commands.estimate.vision import count_vision_tokens
from trl_prefix_share.commands.image_preferences import image_preference_dataset, main


def test_generated_set_is_deterministic_and_repeats_questions_over_images():
    first, again = image_preference_dataset(32, seed=5), image_preference_dataset(32, seed=5)
    assert first["prompt"] == again["prompt"] and first["chosen"] == again["chosen"]
    assert first[0]["images"][0].tobytes() == again[0]["images"][0].tobytes()
    questions = [row[0]["content"] for row in first["prompt"]]
    assert len(set(questions)) < len(questions)  # the same question over different images
    assert all(c != r for c, r in zip(first["chosen"], first["rejected"], strict=True))


def test_generator_script_writes_a_dataset(tmp_path):
    from datasets import load_from_disk

    main(["--out", str(tmp_path / "set"), "--examples", "6", "--plain"])
    saved = load_from_disk(str(tmp_path / "set"))
    assert len(saved) == 6 and saved[0]["prompt"].startswith("<image>")


@pytest.fixture(scope="module")
def llava_processor():
    return build_vision_model("llava").processor


def test_estimate_counts_image_tokens_and_images_once(llava_processor):
    data = image_preference_dataset(10, seed=2, conversational=True)
    estimate = count_vision_tokens(data, llava_processor, batch_size=4, max_length=None, seed=0)
    assert estimate.batches == 3 and estimate.examples == 10
    assert estimate.stock_images_encoded == 20 and estimate.packed_images_encoded == 10
    # LLaVA: 16 image tokens per image; stock holds each prompt twice, the packed rows once
    assert estimate.stock_image_tokens == 2 * 16 * 10 and estimate.packed_image_tokens == 16 * 10
    assert estimate.token_ratio > 1.3


def test_estimate_command_with_a_saved_processor(llava_processor, tmp_path, capsys):
    from trl_prefix_share.commands.estimate import run_estimate

    llava_processor.save_pretrained(tmp_path / "processor")
    out = tmp_path / "estimate.json"
    run_estimate(
        ["--dataset", "shapes", "--processor", str(tmp_path / "processor"), "--limit", "8", "--json", str(out)]
    )
    assert "image tokens" in capsys.readouterr().out
    payload = json.loads(out.read_text())["estimates"][0]
    assert payload["stock_images_encoded"] == 2 * payload["packed_images_encoded"] == 16


def test_estimate_command_asks_for_a_processor_on_image_data():
    from trl_prefix_share.commands.estimate import run_estimate

    with pytest.raises(SystemExit, match="--processor"):
        run_estimate(["--dataset", "shapes", "--tokenizer", "unused", "--limit", "4"])


def test_bench_on_images_encodes_each_image_once(tmp_path):
    """A tiny Qwen2.5-VL-shaped model, one step: stock encodes every image four times per step (chosen and
    rejected, policy and reference), ours twice; fewer tokens, image tokens included."""
    from trl_prefix_share.commands.bench.runner import BenchSettings, run_benchmark
    from trl_prefix_share.commands.bench.vision import VisionShape

    shape = VisionShape(
        layers=1,
        hidden=64,
        heads=2,
        kv_heads=1,
        intermediate=128,
        vision_depth=1,
        vision_hidden=32,
        vision_heads=2,
        image_size=56,
    )
    settings = BenchSettings(
        datasets=["shapes"],
        variants=["stock", "ours"],
        batch_size=2,
        steps=1,
        warmup=1,
        rounds=1,
        vision_shape=shape,
        vision_examples=6,
        device="cpu",
    )
    report = run_benchmark(settings, log=lambda line: None)
    runs = {run.variant: run for run in report.runs}
    assert runs["stock"].images_per_step == 2 * runs["ours"].images_per_step == 8
    assert runs["ours"].tokens_per_step < runs["stock"].tokens_per_step
    assert report.whole_file[0].token_limit > 1.2
