"""Which models online RL's left-padded rows can be packed for, and the construction probe that checks it.

GRPO and RLOO score left-padded rows without ``position_ids``. Transformers then numbers positions by column
(``arange``), and the packed rows reproduce those column positions exactly. A model with a learned table of absolute
positions may number them another way (OPT and BioGPT count from the attention mask), and for such a table the
numbering changes every result, so these models are refused by what they are: the structural rule below holds with
the probe off and under sharded launchers. Rotary models only see position differences, which are the same either
way. The probe then scores left-padded rows the stock way and packed, including a duplicated and an empty completion.
"""

from __future__ import annotations

import torch

from trl_prefix_share.core.layout import move_to_device
from trl_prefix_share.core.model_support import (
    UnsupportedModelError,
    check_probe,
    clipped_windows,
    enable_prefix_sharing,
    verify_packed_forward,
)
from trl_prefix_share.core.online.rows import pack_completion_rows
from trl_prefix_share.core.packing import PACKED_KEY
from trl_prefix_share.core.tree_support import probe_packing

#: Attribute names of learned or fixed absolute position tables (GPT-2 `wpe`, OPT/BioGPT `embed_positions`, ...).
POSITION_TABLE_NAMES = frozenset({"wpe", "embed_positions", "position_embeddings", "pos_emb", "embed_pos"})


def absolute_position_tables(model: torch.nn.Module) -> list[str]:
    """Names of the model's absolute position tables (empty for rotary / relative-position models)."""
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in POSITION_TABLE_NAMES]


def check_online_positions(model: torch.nn.Module) -> None:
    """Refuse a model whose positions of left-padded rows the packed rows cannot reproduce for certain."""
    tables = absolute_position_tables(model)
    if tables:
        raise UnsupportedModelError(
            f"{type(model).__name__} adds absolute position embeddings (`{tables[0]}`): how it numbers the positions "
            "of online RL's left-padded rows depends on the model, so the packed rows cannot be guaranteed to match"
        )


def enable_online_prefix_sharing(model: torch.nn.Module, kernel: str) -> None:
    """The structural rule for left-padded rows, then the usual switch to the packed forward."""
    check_online_positions(model)
    enable_prefix_sharing(model, kernel)


def _probe_rows(vocab_size: int, extra_padding: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two prompts (6 and 3 tokens) with 3 and 2 completions: one completion repeated, one empty."""
    high = max(3, min(vocab_size, 200))
    generator = torch.Generator().manual_seed(1)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, high, (n,), generator=generator).tolist()

    head = tokens(2)  # common to both prompts, at other position ids (left padding): merged where positions shift
    long_prompt, short_prompt = head + tokens(4), head + tokens(1)
    first, second = tokens(5), tokens(3)
    rows = [(long_prompt, first), (long_prompt, second), (long_prompt, first), (short_prompt, tokens(4))]
    rows.append((short_prompt, []))
    width, completion_width = 6 + extra_padding, 5
    input_ids = torch.zeros(len(rows), width + completion_width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, completion) in enumerate(rows):
        input_ids[row, width - len(prompt) : width] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) : width] = 1
        if completion:
            input_ids[row, width : width + len(completion)] = torch.tensor(completion)
            attention_mask[row, width : width + len(completion)] = 1
    return input_ids, attention_mask, completion_width


def _score_rows(model, input_ids, attention_mask, keep: int, **extra) -> torch.Tensor:
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-keep] = -100
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, use_cache=False, **extra
    )
    return outputs.log_probs[:, -keep:].float()


@torch.no_grad()
def verify_online_forward(model: torch.nn.Module, kernel: str, device: torch.device) -> None:
    """The preference probe (documents, K branches, windows), then left-padded online-RL rows: stock vs packed.

    The noise reference scores the same rows with more left padding (stock both times): the positions shift, so a
    rotary model's own rounding shows, while a wrong context or a wrong position moves log-probs far beyond it.
    """
    verify_packed_forward(model, kernel, device)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    input_ids, attention_mask, keep = _probe_rows(vocab_size)
    wider_ids, wider_mask, _ = _probe_rows(vocab_size, extra_padding=3)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    wider_ids, wider_mask = wider_ids.to(device), wider_mask.to(device)
    packed = pack_completion_rows(input_ids, attention_mask, keep, pad_token_id=0, options=probe_packing(model, kernel))
    mask = attention_mask[:, -keep:].bool()
    was_training = model.training
    model.eval()
    try:
        with clipped_windows(model):
            stock = _score_rows(model, input_ids, attention_mask, keep)
            wider = _score_rows(model, wider_ids, wider_mask, keep)
            ours = _score_rows(model, input_ids, attention_mask, keep, **{PACKED_KEY: move_to_device(packed, device)})
    finally:
        model.train(was_training)
    check_probe(model, ours, stock, wider, mask, "on left-padded online-RL rows the packed forward differs from stock")
