"""The self-contained demo: its task generator, its tokenizer, and a few real training steps end to end."""

from __future__ import annotations

import math

import pytest

from trl_prefix_share.commands.demo import QUESTIONS, build_tokenizer, main, make_preference_task


def parse_prompt(prompt: str) -> tuple[list[int], str]:
    """The listed numbers and the question of a generated prompt."""
    head, question = prompt.split(" question: ")
    assert head.startswith("numbers: ") and question.endswith(" ?")
    return [int(word) for word in head.removeprefix("numbers: ").split()], question.removesuffix(" ?")


def test_task_is_deterministic_under_a_seed():
    first, again, other = (make_preference_task(32, seed) for seed in (7, 7, 8))
    assert first.to_list() == again.to_list()
    assert first.to_list() != other.to_list()


def test_task_answers_are_right_and_rejected_ones_wrong():
    task = make_preference_task(200, seed=0)
    assert task.column_names == ["prompt", "chosen", "rejected"]
    assert {parse_prompt(row["prompt"])[1] for row in task} == set(QUESTIONS)
    for row in task:
        numbers, question = parse_prompt(row["prompt"])
        assert 20 <= len(numbers) <= 40
        assert len(set(numbers)) == len(numbers)
        chosen, rejected = int(row["chosen"]), int(row["rejected"])
        assert chosen == (max(numbers) if question == "largest" else min(numbers))
        assert rejected in numbers
        assert row["chosen"] != row["rejected"]


def test_tokenizer_covers_the_task_and_splits_off_eos():
    """TRL appends the EOS string without a space ("31<eos>"); it must still be its own token, and nothing unknown."""
    tokenizer = build_tokenizer()
    row = make_preference_task(1, seed=3)[0]
    ids = tokenizer(row["prompt"] + row["chosen"] + tokenizer.eos_token)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[-2:-1]) == row["chosen"].strip()
    assert len(ids) == len(row["prompt"].split()) + 2


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return main(["--quick", "--steps", "3", "--batch-size", "8", "--output-dir", str(tmp_path_factory.mktemp("demo"))])


def test_quick_demo_trains_the_requested_steps(quick_run):
    assert quick_run["steps"] == 3
    assert math.isfinite(quick_run["train_loss"])
    assert math.isfinite(quick_run["eval_after"]["eval_loss"])


def test_quick_demo_starts_from_the_reference(quick_run):
    """Before training the policy is a copy of the reference: DPO loss is exactly log 2 and every reward is 0."""
    before = quick_run["eval_before"]
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert 0.0 <= before["answer_accuracy"] <= 1.0


def test_quick_demo_saves_tokens(quick_run):
    assert quick_run["tokens"] > 0
    assert quick_run["stock_tokens"] > quick_run["tokens"]
    assert quick_run["token_ratio"] == pytest.approx(quick_run["stock_tokens"] / quick_run["tokens"])
    assert quick_run["token_ratio"] > 1
    assert 0 < quick_run["percent_saved"] < 100


@pytest.mark.slow
def test_a_short_run_learns_to_prefer_the_right_answer(tmp_path):
    """The demo's claim at a third of its default length: both accuracies end well above where they started."""
    result = main(["--steps", "20", "--output-dir", str(tmp_path)])
    before, after = result["eval_before"], result["eval_after"]
    assert result["steps"] == 20
    assert after["eval_rewards/accuracies"] >= 0.8 > before["eval_rewards/accuracies"]
    assert after["answer_accuracy"] >= 0.8
    assert after["answer_accuracy"] > before["answer_accuracy"] + 0.2
    assert after["eval_loss"] < before["eval_loss"]


def test_vision_demo_encodes_each_image_once(capsys):
    result = main(["--vision", "--quick", "--batch-size", "4"])
    assert result["steps"] == 4
    assert result["images"] == 4 * 4  # one per pair, not two
    assert result["token_ratio"] > 1.3
    assert "images encoded" in capsys.readouterr().out
