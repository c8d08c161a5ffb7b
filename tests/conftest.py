"""Shared test fixtures: real data and tokenizer from ../shared, tiny models of several families built from configs.

Nothing is downloaded: models are created from configs and saved to a temporary directory, so TRL loads the policy
and its reference from a local path exactly as it would load a hub model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(os.environ.get("TRL_PREFIX_SHARE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA = SHARED / "data"
TOKENIZER_DIR = SHARED / "tokenizers" / "smollm"

if not TOKENIZER_DIR.exists():  # pragma: no cover - CI always has ../shared
    pytest.exit(f"../shared not found at {SHARED}; set TRL_PREFIX_SHARE_SHARED", returncode=2)

DATASETS = {
    "hh_harmless": "hh_harmless_base_test.jsonl",
    "hh_helpful": "hh_helpful_base_test.jsonl",
    "ultrafeedback": "ultrafeedback_binarized_1200.jsonl",
    "pandalm": "pandalm_human_testset.jsonl",
}

# Tiny configs of several families; `mistral` uses a sliding window shorter than the sequences.
FAMILIES = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "mistral": dict(model_type="mistral", sliding_window=24),
}


def read_jsonl(name: str, limit: int | None = None, offset: int = 0) -> list[dict]:
    rows = []
    with open(DATA / DATASETS[name], encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index < offset:
                continue
            if limit is not None and len(rows) >= limit:
                break
            rows.append(json.loads(line))
    return rows


def load_dataset_rows(name: str, limit: int, offset: int = 0) -> Dataset:
    return Dataset.from_list(read_jsonl(name, limit, offset))


def conversational(rows: Dataset) -> Dataset:
    """The same examples as chat messages, so the tokenizer's chat template is exercised."""
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def build_tiny_model(
    family: str, vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides
) -> torch.nn.Module:
    """A 2-layer model of `family`, in float64 by default (see `equivalence.EQUIVALENCE_DTYPE`)."""
    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        **{**spec, **overrides},
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def save_tiny_model(directory: Path, tokenizer, model_type: str, reward: bool = False, **fields) -> str:
    """Build a float64 model of ``model_type`` from a config (seed 0; causal LM, or a 1-label classifier when
    ``reward``) and save it with ``tokenizer`` to ``directory``, so trainers load it like a hub model; returns the path.
    ``fields`` override the config (the vocabulary and padding come from the tokenizer)."""
    from transformers import AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        model_type,
        **{"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **fields},
        **({"num_labels": 1} if reward else {}),
    )
    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    auto.from_config(config, dtype=torch.float64).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def tiny_moe_config(vocab_size: int, **overrides):
    """A 2-layer Qwen3-MoE config (4 experts, top 2) with the router's load-balancing loss on."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.5,
        output_router_logits=True,
    )
    return AutoConfig.for_model("qwen3_moe", **{**fields, **overrides})


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """Factory: path of a saved tiny model of a family (built once per session)."""
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            build_tiny_model(family, len(tokenizer)).save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[family] = str(path)
        return cache[family]

    return get
