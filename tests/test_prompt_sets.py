"""Prompt sets of every shape a user trains GRPO / RLOO on: plain, conversational, and implicit in chosen/rejected
(HH-RLHF), read by `bench --trainer grpo` and `estimate --trainer grpo` alike; and the online bench summary as
ratios of sums."""

from __future__ import annotations

import json

from conftest import DATA, DATASETS, TOKENIZER_DIR, read_jsonl
from trl.data_utils import extract_prompt

from trl_prefix_share.commands.bench.online import OnlineRun, prompt_rows, summarize_online
from trl_prefix_share.commands.cli import main
from trl_prefix_share.commands.prompt_sets import prompt_of, prompt_only_rows, prompt_token_ids


def test_implicit_prompts_are_trls_extraction(tokenizer):
    rows = read_jsonl("hh_harmless", 20)
    assert all("prompt" not in row for row in rows)
    prompts, missing = prompt_only_rows(rows)
    assert missing == 0 and len(prompts) == 20
    for row, kept in zip(rows, prompts, strict=True):
        assert kept["prompt"] == extract_prompt(row)["prompt"]
        assert kept["prompt"].startswith("\n\nHuman:") and not kept["prompt"].endswith(row["chosen"][-20:])


def test_conversational_and_plain_prompts_and_rows_without_one(tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert prompt_of({"prompt": messages}) == messages
    assert prompt_of({"prompt": "plain"}) == "plain"
    assert prompt_of({"text": "no prompt here"}) is None
    ids = prompt_token_ids(messages, tokenizer)
    assert (
        ids
        == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert len(ids) > len(tokenizer("What is the capital of France?")["input_ids"])  # the template's tokens count
    rows, missing = prompt_only_rows([{"prompt": messages}, {"text": "x"}, {"prompt": "plain"}])
    assert [row["prompt"] for row in rows] == [messages, "plain"] and missing == 1


def test_bench_reads_implicit_and_conversational_prompt_files(tokenizer, tmp_path):
    """Before, `prompt_rows` kept only string `prompt` fields: HH and chat-message files gave no rows."""
    hh = prompt_rows(str(DATA / DATASETS["hh_harmless"]), tokenizer)
    assert len(hh) == len(read_jsonl("hh_harmless")) and all(row["prompt"].startswith("\n\nHuman:") for row in hh)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}]}) + "\n" for r in read_jsonl("pandalm", 8)
        )
    )
    rows = prompt_rows(str(chat), tokenizer)
    assert len(rows) == 8 and all(isinstance(row["prompt"], list) for row in rows)


def test_estimate_reads_an_implicit_prompt_file(tmp_path, capsys):
    out = tmp_path / "hh.json"
    argv = ["estimate", "--trainer", "grpo", "--dataset", str(DATA / DATASETS["hh_harmless"])]
    argv += ["--tokenizer", str(TOKENIZER_DIR), "--limit", "32", "--batch-size", "16", "--num-generations", "8"]
    main([*argv, "--max-completion-length", "32", "--no-progress", "--json", str(out)])
    estimate = json.loads(out.read_text())["estimates"][0]
    assert estimate["prompts"] == 32 and estimate["ratio"] > 2.0  # long dialogue prompts, 8 completions each
    assert "GRPO" in capsys.readouterr().out


def test_online_summary_is_a_ratio_of_sums():
    """Steps that draw prompts of other lengths: the speedup is total stock time over total ours, not a ratio of
    medians (here the medians would give 2.0)."""

    def run(variant: str, seconds: list[float]) -> OnlineRun:
        zeros = [0.0] * len(seconds)
        return OnlineRun("p", "grpo", variant, 0, seconds, zeros, zeros, seconds, 10, 30)

    cells = summarize_online([run("stock", [2.0, 2.0, 20.0]), run("ours", [1.0, 1.0, 19.0])])
    (cell,) = cells
    assert cell["training_speedup"] == 24.0 / 21.0
    assert cell["stock_training_s"] == 8.0 and cell["ours_training_s"] == 7.0
    assert cell["token_limit"] == 3.0 and cell["share_of_limit"] == (24.0 / 21.0) / 3.0
