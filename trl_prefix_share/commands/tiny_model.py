"""`make-tiny-model OUT --tokenizer DIR`: a tiny random causal LM built from a config (no download)."""

from __future__ import annotations

import argparse

import torch


def run_make_tiny_model(argv: list[str]) -> None:
    """`make-tiny-model OUT --tokenizer DIR`: a tiny random causal LM for smoke tests and CPU recipes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(prog="trl-prefix-share make-tiny-model")
    parser.add_argument("output_dir")
    parser.add_argument("--tokenizer", required=True, help="tokenizer name or directory (copied next to the model)")
    parser.add_argument("--family", default="llama", help="model_type of the config (llama, qwen2, qwen3, mistral)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = AutoConfig.for_model(
        args.family,
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    torch.manual_seed(args.seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"[trl-prefix-share] tiny {args.family} model saved to {args.output_dir}")
