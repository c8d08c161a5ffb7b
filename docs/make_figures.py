"""Draw `docs/packed_layout.png`: a real packed row and the attention mask derived from its layout.

    OMP_NUM_THREADS=1 .venv/bin/python docs/make_figures.py [--tokenizer DIR] [--out docs/packed_layout.png]

Nothing in the picture is drawn by hand. Three preference pairs go through TRL's own `DataCollatorForPreference` and
the package's layout code (`collator.sequences_from_padded_batch`, `collator.pair_documents`,
`layout.pack_documents`), exactly as the trainer's collator does it. Panel (a) shows the packed row that comes out;
panel (b) the attention mask computed from its `document_ids` / `branch_ids`, checked against the index tensors the
CPU attention kernel actually uses (`attention_buckets`), so a figure that disagrees with the kernel cannot be drawn.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trl_prefix_share.core.attention.sdpa_packed import bucket_mask
from trl_prefix_share.core.layout import IGNORE_INDEX, PAD_DOCUMENT, DocumentSpec, pack_documents
from trl_prefix_share.core.preference.collator import pair_documents, sequences_from_padded_batch

DOCS = Path(__file__).resolve().parent
DEFAULT_OUT = DOCS / "packed_layout.png"

#: (prompt, chosen, rejected). The last pair has identical responses: one branch scores both sequences.
EXAMPLES = [
    ("Capital of France?", " Paris.", " Rome, I think."),
    ("What is 2+2?", " 4", " 5"),
    ("Say hi.", " Hi!", " Hi!"),
]
PAD_TO_MULTIPLE_OF = 8  # shows row padding, as `pad_rows_to_multiple_of` does on GPU (128 there)

ROLES = ("prompt", "chosen", "rejected", "both", "pad")
ROLE_COLOURS = {
    "prompt": "#4c78a8",
    "chosen": "#54a24b",
    "rejected": "#e45756",
    "both": "#b279a2",
    "pad": "#d9d9d9",
}
ROLE_LABELS = {
    "prompt": "shared prompt (run once)",
    "chosen": "chosen branch",
    "rejected": "rejected branch",
    "both": "chosen = rejected (one branch, scored for both)",
    "pad": "row padding",
}


@dataclass
class PackedExample:
    """One packed row and what is needed to label it."""

    packed: dict[str, Any]
    documents: list[DocumentSpec]
    labels: list[str]  # display text of every token of the row
    roles: list[str]  # one of ROLES per position


def default_tokenizer_dir() -> Path:
    """The SmolLM tokenizer in the shared folder (the tests' `TRL_PREFIX_SHARE_SHARED` convention)."""
    shared = Path(os.environ.get("TRL_PREFIX_SHARE_SHARED", DOCS.parents[1] / "shared"))
    return shared / "tokenizers" / "smollm"


def tokenize(tokenizer: Any, examples: list[tuple[str, str, str]]) -> list[dict[str, list[int]]]:
    """Token ids in TRL's preference format; responses end with EOS, as TRL appends it."""
    eos = [tokenizer.eos_token_id]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return [
        {"prompt_ids": ids(prompt), "chosen_ids": ids(chosen) + eos, "rejected_ids": ids(rejected) + eos}
        for prompt, chosen, rejected in examples
    ]


def token_label(tokenizer: Any, token_id: int) -> str:
    """Short display text of a token: a leading space as a middle dot, special tokens by a short name."""
    if token_id == tokenizer.eos_token_id:
        return "<eos>"
    if token_id == tokenizer.pad_token_id:
        return "<pad>"
    return tokenizer.decode([token_id]).replace(" ", "\u00b7")


def position_roles(packed: dict[str, Any], documents: list[DocumentSpec]) -> list[str]:
    """Role of every position of the (single) row, from its document and branch ids.

    A pair document's sequences are (chosen, rejected); branch b lays out `documents[d].branches[b - 1]`, and an
    aliased document (identical responses) has one branch for both.
    """
    roles = []
    for document, branch in zip(packed["document_ids"][0].tolist(), packed["branch_ids"][0].tolist(), strict=True):
        if document == PAD_DOCUMENT:
            roles.append("pad")
        elif branch == 0:
            roles.append("prompt")
        else:
            doc = documents[document]
            member = doc.branches[branch - 1]
            aliased = len(doc.branches) < len(doc.sequences)
            roles.append("both" if aliased else ("chosen", "rejected")[member])
    return roles


def build_example(tokenizer: Any, examples: list[tuple[str, str, str]] = EXAMPLES) -> PackedExample:
    """The packed layout of `examples`, built by the same steps as `PrefixSharedPreferenceCollator`."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(tokenize(tokenizer, examples))
    sequences = sequences_from_padded_batch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    documents = pair_documents(sequences, share_prefix=True)
    packed = pack_documents(
        documents,
        num_virtual_rows=batch["input_ids"].size(0),
        virtual_length=batch["input_ids"].size(1),
        pad_token_id=tokenizer.pad_token_id,
        pad_to_multiple_of=PAD_TO_MULTIPLE_OF,
    )
    if packed["input_ids"].size(0) != 1:
        raise RuntimeError("The figure expects the examples to fit one packed row.")
    labels = [token_label(tokenizer, token) for token in packed["input_ids"][0].tolist()]
    return PackedExample(packed, documents, labels, position_roles(packed, documents))


def mask_from_layout(document_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """Dense `[T, T]` attention mask of one row (query, key) by the packed rule.

    Same document, key not after the query in the row, key in the shared prefix or in the query's own branch. Row
    padding attends to nothing here (the kernels never compute it).
    """
    doc_q, doc_k = document_ids[:, None], document_ids[None, :]
    branch_q, branch_k = branch_ids[:, None], branch_ids[None, :]
    length = document_ids.numel()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (doc_q == doc_k) & (doc_q != PAD_DOCUMENT) & causal & ((branch_k == 0) | (branch_k == branch_q))


def mask_from_sdpa_buckets(buckets: list[dict[str, Any]], length: int) -> torch.Tensor:
    """Dense `[T, T]` mask that the CPU kernel computes: its attention groups, with the kernel's own `bucket_mask`.

    A group's query slots and key slots map to row positions through `query_index` / `key_index`; only the slots
    listed in `query_slots` are real queries. `bucket_mask` returns `None` where the kernel calls SDPA with
    `is_causal=True` (top-left causal over the slots).
    """
    mask = torch.zeros(length, length, dtype=torch.bool)
    for bucket in buckets:
        query_index, key_index = bucket["query_index"], bucket["key_index"]
        groups, query_slots = query_index.shape
        visible = bucket_mask(bucket, sliding_window=None)
        if visible is None:
            visible = torch.ones(query_slots, key_index.size(1), dtype=torch.bool).tril().expand(groups, -1, -1)
        else:
            visible = visible[:, 0]
        real = torch.zeros(groups * query_slots, dtype=torch.bool)
        real[bucket["query_slots"]] = True
        group, slot, key = (visible & real.view(groups, query_slots, 1)).nonzero(as_tuple=True)
        mask[query_index[group, slot], key_index[group, key]] = True
    return mask


def checked_mask(example: PackedExample) -> torch.Tensor:
    """The layout-rule mask, after checking that the SDPA kernel's groups compute exactly that mask."""
    packed = example.packed
    mask = mask_from_layout(packed["document_ids"][0], packed["branch_ids"][0])
    kernel = mask_from_sdpa_buckets(packed["attention_buckets"], mask.size(0))
    if not torch.equal(mask, kernel):
        raise RuntimeError("The layout rule and the SDPA kernel's attention groups disagree.")
    return mask


# -- drawing -----------------------------------------------------------------------------------------------------------


def document_spans(document_ids: list[int]) -> list[tuple[int, int, int]]:
    """(document, first position, end position) of each document of a row, in row order."""
    spans: list[tuple[int, int, int]] = []
    for index, document in enumerate(document_ids):
        if document == PAD_DOCUMENT:
            continue
        if spans and spans[-1][0] == document:
            spans[-1] = (document, spans[-1][1], index + 1)
        else:
            spans.append((document, index, index + 1))
    return spans


def branch_heads(branch_ids: list[int]) -> list[int]:
    """Positions that start a branch: the repeated last prompt token of a shared document."""
    return [i for i in range(1, len(branch_ids)) if branch_ids[i] > 0 and branch_ids[i] != branch_ids[i - 1]]


def draw_row(ax: Any, example: PackedExample) -> None:
    """Panel (a): one cell per packed position, coloured by role, with its token, position id and documents."""
    from matplotlib.patches import Rectangle

    packed = example.packed
    positions = packed["position_ids"][0].tolist()
    scored = (packed["shift_labels"][0] != IGNORE_INDEX).tolist()
    heads = set(branch_heads(packed["branch_ids"][0].tolist()))
    for x, (label, role) in enumerate(zip(example.labels, example.roles, strict=True)):
        edge = {"edgecolor": "black", "linewidth": 2.2} if x in heads else {"edgecolor": "white", "linewidth": 1}
        ax.add_patch(Rectangle((x, 0), 1, 1, facecolor=ROLE_COLOURS[role], **edge))
        ax.text(x + 0.5, 0.5, label, rotation=90, ha="center", va="center", fontsize=8, color="white")
        ax.text(x + 0.5, -0.25, str(positions[x]), ha="center", va="center", fontsize=7.5)
        if scored[x]:
            ax.plot(x + 0.5, 1.15, marker="v", markersize=3.5, color="black")
    for document, start, end in document_spans(packed["document_ids"][0].tolist()):
        ax.plot([start + 0.05, end - 0.05], [1.45, 1.45], color="black", linewidth=1)
        ax.text((start + end) / 2, 1.65, f"document {document} (pair {document})", ha="center", fontsize=8.5)
        ax.axvline(start, ymin=0.1, ymax=0.62, color="black", linewidth=0.8, linestyle=":")
    ax.text(-0.3, -0.25, "position", ha="right", va="center", fontsize=7.5)
    ax.text(-0.3, 1.15, "scored", ha="right", va="center", fontsize=7.5)
    ax.set_xlim(-3.2, len(example.labels) + 0.2)
    ax.set_ylim(-0.6, 2.0)
    ax.set_axis_off()
    ax.set_title(
        "(a) One packed row: 3 preference pairs, each prompt laid out once; bold cell = last prompt token, "
        "repeated at the head of each branch",
        fontsize=9.5,
        loc="left",
    )


def draw_mask(ax: Any, example: PackedExample, mask: torch.Tensor) -> None:
    """Panel (b): who attends to whom; an allowed cell takes the colour of its key's role."""
    from matplotlib.colors import to_rgb

    length = mask.size(0)
    image = torch.ones(length, length, 3)
    for key, role in enumerate(example.roles):
        image[mask[:, key], key] = torch.tensor(to_rgb(ROLE_COLOURS[role]))
    padded = torch.tensor([role == "pad" for role in example.roles])
    image[padded] = torch.tensor(to_rgb(ROLE_COLOURS["pad"])) * 0.6 + 0.4
    image[:, padded] = torch.tensor(to_rgb(ROLE_COLOURS["pad"])) * 0.6 + 0.4
    ax.imshow(image.numpy(), interpolation="nearest")
    ticks = range(length)
    ax.set_xticks(ticks, [f"{label} {i}" for i, label in enumerate(example.labels)], rotation=90, fontsize=6.5)
    ax.set_yticks(ticks, [f"{i} {label}" for i, label in enumerate(example.labels)], fontsize=6.5)
    ax.set_xticks([t - 0.5 for t in range(1, length)], minor=True)
    ax.set_yticks([t - 0.5 for t in range(1, length)], minor=True)
    ax.grid(which="minor", color="#f0f0f0", linewidth=0.4)
    ax.tick_params(which="minor", length=0)
    for _, start, end in document_spans(example.packed["document_ids"][0].tolist()):
        for edge in (start - 0.5, end - 0.5):
            ax.axhline(edge, color="black", linewidth=0.8)
            ax.axvline(edge, color="black", linewidth=0.8)
    ax.set_xlabel("key (attended to)", fontsize=8.5)
    ax.set_ylabel("query (attending)", fontsize=8.5)
    ax.set_title(
        "(b) Attention mask from document_ids / branch_ids (checked against the CPU kernel's groups): "
        "rejected rows see the prompt,\nnot the chosen branch; documents never see each other",
        fontsize=9.5,
        loc="left",
    )


def draw(example: PackedExample, mask: torch.Tensor, out: Path) -> None:
    """Both panels in one PNG, with a shared legend; no timestamp metadata, so reruns give the same file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    figure = plt.figure(figsize=(10.5, 13.2), dpi=100)
    grid = figure.add_gridspec(2, 1, height_ratios=[1, 5.2], hspace=0.12)
    draw_row(figure.add_subplot(grid[0]), example)
    draw_mask(figure.add_subplot(grid[1]), example, mask)
    present = [role for role in ROLES if role in example.roles]
    handles = [Patch(facecolor=ROLE_COLOURS[role], label=ROLE_LABELS[role]) for role in present]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8.5, frameon=False)
    figure.subplots_adjust(left=0.1, right=0.98, top=0.97, bottom=0.09)
    figure.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(default_tokenizer_dir()), help="tokenizer directory or hub name")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output PNG")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    example = build_example(AutoTokenizer.from_pretrained(args.tokenizer))
    draw(example, checked_mask(example), Path(args.out))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB, {len(example.labels)} positions)")


if __name__ == "__main__":
    main()
