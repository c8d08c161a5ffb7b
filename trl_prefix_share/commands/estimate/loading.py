"""Loading a preference dataset (local file or hub) and a tokenizer the way the commands accept them."""

from __future__ import annotations

import sys
from pathlib import Path

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_preference_dataset(name_or_file: str, split: str = "train", config: str | None = None):
    """A local .jsonl/.json/.parquet/.csv file, or a dataset on the hub, as a `datasets.Dataset`."""
    from datasets import load_dataset

    path = Path(name_or_file)
    if path.suffix in LOCAL_FORMATS and path.is_file():
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split=split)
    return load_dataset(name_or_file, name=config, split=split)


def load_tokenizer(name_or_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    if not tokenizer.is_fast:
        print("[trl-prefix-share] slow (Python) tokenizer: the estimate will take a while", file=sys.stderr)
    return tokenizer
