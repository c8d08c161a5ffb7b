"""The savings estimator counts exactly the tokens the trainers process, and its command prints and writes them.

The reference is the trainer itself: `PrefixSharedDPOTrainer.prefix_share_totals` after one epoch (stock TRL's padded
batch `input_ids.numel()` and our packed rows), on real data, plain and conversational, shuffled and sequential.
"""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import torch
from conftest import DATA, DATASETS, TOKENIZER_DIR, conversational, load_dataset_rows, read_jsonl
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from test_layout import build, layouts
from transformers import AutoTokenizer
from trl.data_utils import extract_prompt

from trl_prefix_share import PrefixSharedDPOConfig, PrefixSharedDPOTrainer
from trl_prefix_share.commands.cli import main
from trl_prefix_share.commands.estimate import estimate_savings, split_point, tokenize_pairs
from trl_prefix_share.commands.estimate.counting import tree_tokens
from trl_prefix_share.commands.estimate.tokenization import _extract_prompt, prompt_bytes
from trl_prefix_share.core.layout.tree import MIN_SHARED_TOKENS

BATCH = 4
PAIR_FIELDS = ("prompt", "chosen", "rejected", "chosen_seq", "rejected_seq", "prompt_seq", "document", "identical")


def trained_totals(model_path: str, tokenizer, dataset, **overrides) -> dict[str, int]:
    """Tokens the trainer logged over one epoch (stock TRL's padded batches and our packed rows)."""
    args = PrefixSharedDPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        save_strategy="no",
        **overrides,
    )
    trainer = PrefixSharedDPOTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return dict(trainer.prefix_share_totals)


@pytest.mark.parametrize("min_shared", [MIN_SHARED_TOKENS, 2], ids=["default-tree-minimum", "trees-on-hh-heads"])
def test_plain_shuffled_counts_equal_the_trainers(model_dir, tokenizer, min_shared):
    """Implicit-prompt plain text, the Trainer's seeded shuffle, truncation, one pair with identical responses; trees
    left out on hh's few common template tokens (the default minimum) and built on them (a minimum of 2)."""
    rows = load_dataset_rows("hh_harmless", 15)
    rows = rows.map(lambda row, i: {**row, "rejected": row["chosen"]} if i == 5 else row, with_indices=True)
    settings = dict(max_length=192, seed=3, prefix_tree_min_shared_tokens=min_shared)
    totals = trained_totals(model_dir("llama"), tokenizer, rows, **settings)

    estimate = estimate_savings(rows, tokenizer, batch_size=BATCH, **settings)
    assert (estimate.stock_tokens, estimate.tokens) == (totals["stock_tokens"], totals["tokens"])
    assert estimate.identical == 1 and estimate.truncated > 0 and estimate.dropped > 0
    assert estimate.batches == -(-estimate.examples // BATCH) and estimate.examples % BATCH  # a short last batch
    assert estimate.implicit_prompt and not estimate.conversational
    # The shuffle matters: dataset order gives other batches and another stock count.
    sequential = estimate_savings(rows, tokenizer, batch_size=BATCH, shuffle=False, **settings)
    assert sequential.tokens == estimate.tokens and sequential.stock_tokens != estimate.stock_tokens


def test_conversational_sequential_counts_equal_the_trainers(model_dir, tokenizer):
    """Chat template, dataset order, dropped long prompts, several packed rows and padding on both sides."""
    rows = conversational(load_dataset_rows("ultrafeedback", 12))
    settings = dict(max_length=160, pad_to_multiple_of=8, max_row_tokens=320, pad_rows_to_multiple_of=16)
    totals = trained_totals(model_dir("llama"), tokenizer, rows, train_sampling_strategy="sequential", **settings)

    estimate = estimate_savings(rows, tokenizer, batch_size=BATCH, shuffle=False, **settings)
    assert (estimate.stock_tokens, estimate.tokens) == (totals["stock_tokens"], totals["tokens"])
    assert estimate.conversational and estimate.dropped > 0 and estimate.truncated > 0
    assert estimate.examples == 12 - estimate.dropped


def test_keep_end_counts_equal_the_trainers(model_dir, tokenizer):
    """`keep_end` truncation keeps different prompt tails: such pairs are laid out unshared, as the collator does."""
    rows = load_dataset_rows("ultrafeedback", 8)
    settings = dict(max_length=128, truncation_mode="keep_end")
    totals = trained_totals(model_dir("llama"), tokenizer, rows, **settings)

    estimate = estimate_savings(rows, tokenizer, batch_size=BATCH, **settings)
    assert (estimate.stock_tokens, estimate.tokens) == (totals["stock_tokens"], totals["tokens"])
    assert estimate.truncated > 0 and estimate.dropped == 0


@hypothesis_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_tree_counts_equal_the_layouts_rows(case):
    """`tree_tokens` (sorted prompts, no tree built) against the tokens `pack_documents` lays out in one row, on
    random documents with common heads, cut and edited prompts and every node rule (the minimum drawn)."""
    documents, _, virtual_length, _, _, min_shared = case
    packed = build(documents, True, virtual_length, None, None, min_shared=min_shared)
    laid_out = [
        list({(tuple(tokens), start): (len(tokens), prompt_bytes(tokens[:start])) for tokens, start, _ in doc}.values())
        for doc in documents
    ]
    assert tree_tokens(laid_out, min_shared) == int((packed["document_ids"] >= 0).sum())


@pytest.mark.parametrize("budget", [None, 384], ids=["one-row", "row-budget"])
def test_group_by_prompt_counts_equal_the_trainers(model_dir, tokenizer, budget):
    """`group_by_prompt`: the prompt-grouped sampler's batches, one document per prompt with each distinct response
    once (PandaLM repeats responses across a prompt's pairs), cut to fit the row budget; stock keeps its shuffle."""
    rows = load_dataset_rows("pandalm", 20)
    settings = dict(max_length=256, seed=5, max_row_tokens=budget)
    totals = trained_totals(model_dir("llama"), tokenizer, rows, group_by_prompt=True, **settings)

    grouped = estimate_savings(rows, tokenizer, batch_size=BATCH, group_by_prompt=True, **settings)
    plain = estimate_savings(rows, tokenizer, batch_size=BATCH, **settings)
    assert grouped.tokens == totals["tokens"]
    assert grouped.stock_tokens == plain.stock_tokens  # stock TRL's own shuffled batches, not the grouped ones
    assert grouped.tokens < plain.tokens and grouped.group_by_prompt


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_spliced_tokenization_equals_trls(name):
    """Encoding the shared start once gives TRL's token ids on every pair (plain and as chat messages).

    A freshly loaded tokenizer: its backend still pads and truncates to 192 as its tokenizer.json says, which only
    `tokenizer(...)` calls reset; the encoder must not inherit that state."""
    rows = load_dataset_rows(name, 150)
    variants = [rows] if "prompt" not in rows.column_names else [conversational(rows), rows]
    for dataset in variants:
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        fast = tokenize_pairs(dataset, tokenizer, max_length=256)
        exact = tokenize_pairs(dataset, tokenizer, max_length=256, exact=True)
        assert fast.spliced_checked > 0 and exact.spliced_checked == 0
        for field in PAIR_FIELDS:
            np.testing.assert_array_equal(getattr(fast, field), getattr(exact, field), err_msg=field)


def test_implicit_prompt_extraction_equals_trls():
    """The faster common-start search splits every pair exactly where `trl.extract_prompt` does, quirks included."""
    edge_cases = [
        ("same text", "same text"),
        ("short", "short and longer"),
        ("longer one", "longer"),
        ("x ends in a space ", "y"),  # differs at 0: TRL reads chosen[-1]
        ("Human: hi Assistant: yes", "Human: hi Assistant: no"),
        ("Human: hi Assistant:  two spaces", "Human: hi Assistant:  2 spaces"),
        ("é café ☕ ok", "é café ☕ no"),
    ]
    rows = read_jsonl("hh_harmless") + read_jsonl("hh_helpful")
    rows += [{"chosen": chosen, "rejected": rejected} for chosen, rejected in edge_cases]
    for row in rows:
        assert _extract_prompt(row) == extract_prompt(row), row


def test_split_point_stays_inside_the_shared_start():
    text = "Human: what is 2 + 2?"
    cut = split_point(text, text + " Four.", text + "  Five.")
    assert text[cut:] == " 2?"
    assert split_point("nospace", "nospace!") == 0
    assert split_point("a  b", "a  bc") == 0  # a double space is not a cut point


def test_estimate_command_prints_the_table_and_writes_json(tmp_path, capsys):
    path = DATA / DATASETS["pandalm"]
    out = tmp_path / "estimate.json"
    main(
        ["estimate", "--dataset", str(path), "--tokenizer", str(TOKENIZER_DIR), "--limit", "40"]
        + ["--batch-size", "2", "8", "--max-length", "512", "--json", str(out), "--no-progress"]
    )
    captured = capsys.readouterr()
    assert "tokenizing" not in captured.err
    assert "40 pairs (plain text); max_length 512; batches shuffled with seed 42" in captured.out
    assert "prompt share of the unpadded tokens" in captured.out and "expected speedup" in captured.out
    table = [line.split() for line in captured.out.splitlines() if line.split()[:2] in (["2", "20"], ["8", "5"])]
    assert len(table) == 2

    payload = json.loads(out.read_text())
    assert [e["batch_size"] for e in payload["estimates"]] == [2, 8]
    rows = read_jsonl("pandalm", 40)
    for entry, line in zip(payload["estimates"], table, strict=True):
        expected = estimate_savings(rows, str(TOKENIZER_DIR), batch_size=entry["batch_size"], max_length=512)
        assert (entry["stock_tokens"], entry["tokens"]) == (expected.stock_tokens, expected.tokens)
        assert entry["speedup_range"] == [expected.sharing_ratio, expected.token_ratio]
        assert line[2:5] == [f"{expected.stock_tokens:,}", f"{expected.unpadded_tokens:,}", f"{expected.tokens:,}"]


def test_progress_bar_goes_to_stderr_unless_silenced(tokenizer, capsys):
    rows = read_jsonl("pandalm", 12)
    estimate_savings(rows, tokenizer, progress=True)
    assert "tokenizing" in capsys.readouterr().err
    estimate_savings(rows, tokenizer, progress=False)
    assert capsys.readouterr().err == ""


def test_estimate_command_on_a_random_sample(tmp_path, capsys):
    out = tmp_path / "sample.json"
    main(
        ["estimate", "--dataset", str(DATA / DATASETS["hh_helpful"]), "--tokenizer", str(TOKENIZER_DIR)]
        + ["--limit", "60", "--sample", "12", "--json", str(out), "--no-progress"]
    )
    assert "(random sample of 12 of 60 examples)" in capsys.readouterr().out
    (entry,) = json.loads(out.read_text())["estimates"]
    assert entry["examples"] + entry["dropped"] == 12 and entry["implicit_prompt"]


# -- GRPO / RLOO -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_shared", [MIN_SHARED_TOKENS, 2], ids=["default-tree-minimum", "trees-on-template-heads"])
def test_online_estimate_counts_what_grpo_logs(model_dir, tokenizer, min_shared):
    """One epoch of PrefixSharedGRPOTrainer (completions run to max_completion_length: a tiny random model never
    stops early) logs exactly the stock and packed tokens the estimate counts for its policy passes: the chat
    template's three common head tokens merged into one tree at a minimum of 2, left out at the default."""
    from online_setup import online_args, real_prompts, vowel_reward

    from trl_prefix_share import PrefixSharedGRPOConfig, PrefixSharedGRPOTrainer
    from trl_prefix_share.commands.estimate.online import count_online_tokens, prompt_token_ids

    dataset = real_prompts(6, offset=80, conversational=True)
    args = online_args(
        PrefixSharedGRPOConfig,
        per_device_train_batch_size=8,
        num_train_epochs=1,
        save_strategy="no",
        prefix_tree_min_shared_tokens=min_shared,
    )
    trainer = PrefixSharedGRPOTrainer(
        model=model_dir("llama"),
        reward_funcs=vowel_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    logged = trainer.prefix_share_totals
    prompt_ids = prompt_token_ids(dataset, tokenizer)
    prompts = np.array([len(ids) for ids in prompt_ids])
    completions = np.full(len(prompts), args.max_completion_length)
    counts = dict(seed=args.seed, prompt_ids=prompt_ids, min_shared_tokens=min_shared)
    estimate = count_online_tokens(prompts, completions, args.num_generations, 8, **counts)
    one_level = count_online_tokens(prompts, completions, args.num_generations, 8, seed=args.seed)
    if min_shared == 2:
        assert estimate.tokens < one_level.tokens
    else:
        assert estimate.tokens == one_level.tokens
    assert estimate.micro_batches == 3
    assert (estimate.stock_tokens, estimate.tokens) == (logged["stock_tokens"], logged["tokens"])


def test_online_estimate_arithmetic_and_command(tmp_path, capsys):
    from trl_prefix_share.commands.estimate.online import count_online_tokens

    # Two prompts (10 and 4 tokens), G = 2, completions of 3: stock pads to 10 + 3 per row.
    estimate = count_online_tokens(np.array([10, 4]), np.array([3, 3]), 2, 4, shuffle=False)
    assert estimate.stock_tokens == 4 * 13
    assert estimate.unpadded_tokens == 2 * 13 + 2 * 7
    assert estimate.tokens == (10 + 2 * 4 - 1) + (4 + 2 * 4 - 1)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        count_online_tokens(np.array([10]), np.array([3]), 4, 6)
    out = tmp_path / "online.json"
    main(
        [
            "estimate",
            "--trainer",
            "grpo",
            "--dataset",
            str(DATA / DATASETS["pandalm"]),
            "--tokenizer",
            str(TOKENIZER_DIR),
            "--limit",
            "64",
            "--batch-size",
            "16",
            "--num-generations",
            "8",
            "--max-completion-length",
            "64",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "GRPO: one log-prob pass" in printed and "vs stock" in printed
    payload = json.loads(out.read_text())
    assert payload["trainer"] == "grpo" and payload["estimates"][0]["ratio"] > 1.0


@pytest.mark.parametrize("trainer", ["dpo", "grpo"])
def test_estimate_command_predicts_peak_memory_from_the_models_config(trainer, model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from trl_prefix_share.commands.estimate.memory import ModelSizes

    directory = model_dir("llama")
    sizes = ModelSizes.from_pretrained(directory)  # read on the meta device: the same sizes as the loaded model
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    assert sizes.parameters == sum(p.numel() for p in loaded.parameters())
    assert sizes.vocab == loaded.config.vocab_size and sizes.layers == loaded.config.num_hidden_layers
    assert sizes.layer_parameters == sum(p.numel() for p in loaded.model.layers[0].parameters())
    loaded.extra_blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3 * sizes.layers))
    assert ModelSizes.from_model(loaded).layers == loaded.config.num_hidden_layers  # the decoder's, not the longest
    out = tmp_path / "estimate.json"
    argv = ["estimate", "--trainer", trainer, "--dataset", str(DATA / DATASETS["pandalm"]), "--limit", "32"]
    argv += ["--tokenizer", str(TOKENIZER_DIR), "--model", directory, "--batch-size", "8", "--no-progress"]
    main([*argv, "--max-completion-length", "32", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "peak step memory above the start (predicted; fp32 on CPU" in printed
    memory = json.loads(out.read_text())["estimates"][0]["memory"]
    assert memory["stock_mib"] > memory["ours_mib"] > 0 and memory["saving"] > 1
    assert memory["stock_moment"] == "head"  # stock's head scores every padded position: that is its peak
    estimate = json.loads(out.read_text())["estimates"][0]
    unshared_ratio = estimate["sharing_ratio"] if trainer == "dpo" else estimate["unpadded_ratio"]
    assert "compute limit (the most sharing can speed a step up" in printed
    assert 1 < estimate["compute_limit"] < unshared_ratio  # the head's work per completion token is not shared
    without = ["estimate", "--trainer", trainer, "--dataset", str(DATA / DATASETS["pandalm"]), "--limit", "8"]
    main([*without, "--tokenizer", str(TOKENIZER_DIR), "--no-progress"])
    printed = capsys.readouterr().out
    assert "peak step memory" not in printed and "compute limit" not in printed  # no model: no claim


def test_memory_phases_follow_the_step_sizes():
    from trl_prefix_share.commands.estimate.memory import ModelSizes, StepSizes, phase_bytes

    sizes = ModelSizes(10_000_000, 1_000_000, 50_000, 512, 1024, 4, 128, tied_embeddings=True)
    small, scored, long = StepSizes(100, 10), StepSizes(100, 4000), StepSizes(50_000, 10)
    assert max(phase_bytes(sizes, small), key=phase_bytes(sizes, small).get) == "end"
    assert max(phase_bytes(sizes, scored), key=phase_bytes(sizes, scored).get) == "head"
    assert max(phase_bytes(sizes, long), key=phase_bytes(sizes, long).get) == "layer"
    # the head's tiles stop growing at TRL's token tile; the saved rows do not
    capped = phase_bytes(sizes, StepSizes(100, 8192))["head"] - phase_bytes(sizes, StepSizes(100, 4096))["head"]
    assert capped == pytest.approx(3 * 4096 * 512 * 4)
    untied = ModelSizes(10_000_000, 1_000_000, 50_000, 512, 1024, 4, 128, tied_embeddings=False)
    assert phase_bytes(untied, small)["end"] == 4 * 10_000_000


def test_forward_work_counts_what_torch_computes():
    """The body's, the attention's and the head's multiply-adds against torch's own flop counter on a real forward
    (eager attention, which computes the full square of scores: the counter sees ``T^2`` pairs there)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trl_prefix_share.commands.estimate.memory import ModelSizes
    from trl_prefix_share.commands.estimate.work import StepWork, forward_flops

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    sizes = ModelSizes.from_model(model)
    tokens = 50
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 1000, (1, tokens)))
    expected = forward_flops(sizes, StepWork(tokens, tokens * tokens, tokens))
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


def test_compute_limit_counts_the_heads_work_that_sharing_keeps():
    """Sharing removes prompt tokens and pairs, never a scored position: with no head the compute limit is the token
    ratio (attention aside); a vocabulary's head pulls it towards 1; attention alone gives the ratio of attended
    pairs, below the token ratio (every branch still attends to the whole prompt)."""
    from trl_prefix_share.commands.estimate.memory import ModelSizes
    from trl_prefix_share.commands.estimate.work import compute_limit, prompt_group_work

    shared, unshared = prompt_group_work(100, [10, 20], shared=True), prompt_group_work(100, [10, 20], shared=False)
    assert (shared.tokens, unshared.tokens, shared.scored, unshared.scored) == (130, 230, 30, 30)
    assert shared.attended_pairs == 5050 + 10 * 100 + 55 + 20 * 100 + 210
    assert unshared.attended_pairs == 110 * 111 // 2 + 120 * 121 // 2
    bodies = ModelSizes(0, 1_000_000, 1, 64, 128, 4, 64, tied_embeddings=False, query_width=1)
    assert compute_limit(bodies, [(100, [10, 20])]) == pytest.approx(230 / 130, rel=1e-3)
    with_head = ModelSizes(0, 1_000_000, 50_000, 512, 128, 4, 64, tied_embeddings=False)
    assert 1 < compute_limit(with_head, [(100, [10, 20])]) < 230 / 130 - 0.2
    attention = ModelSizes(0, 0, 0, 64, 128, 4, 64, tied_embeddings=False, query_width=4096)
    pairs = [prompt_group_work(4096, [32] * 8, shared=s).attended_pairs for s in (False, True)]
    assert compute_limit(attention, [(4096, [32] * 8)]) == pytest.approx(pairs[0] / pairs[1])
    assert pairs[0] / pairs[1] < 8 * 4128 / (4096 + 8 * 32)  # branches attend to the whole prompt
