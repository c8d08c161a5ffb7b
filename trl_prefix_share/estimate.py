"""Savings estimator: tokens stock TRL would run on a preference dataset vs prefix sharing, without a model.

    trl-prefix-share estimate --dataset FILE_OR_HUB_NAME --tokenizer NAME_OR_DIR [--batch-size 8 16] [--json OUT]

The examples are tokenized the way TRL 1.16's `DPOTrainer._prepare_dataset` does (implicit prompt extracted, EOS
appended to plain-text responses, prompt / prompt+chosen / prompt+rejected tokenized separately and the completion
starting where they diverge, examples whose prompt fills `max_length` dropped), but in batches with the fast tokenizer
and with the text the three share encoded once (see `PairEncoder`). Batches are consecutive slices of the permutation
the Trainer's seeded sampler draws in the first epoch, so the totals are those a single-process run logs as
`prefix_share/stock_tokens` and `prefix_share/tokens` (with several processes the same per-device batches are spread
over them).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .layout import assign_rows

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHUNK = 1000

SPEEDUP_NOTE = (
    "The token ratio is the saving in the model body. End to end, small models on CPU gained more than it in our\n"
    "benchmarks (stock TRL also runs its LM head over every padded position, ours over scored ones only); large\n"
    "models and GPUs should expect it or less (fixed per-step costs). The lower figure is prompt sharing alone,\n"
    "against a padding-free baseline (stock TRL 1.16 has none for DPO). Measured figures: docs/benchmarks.md."
)


# -- results ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthStats:
    """Mean, median, 95th percentile and maximum of a token length (before truncation)."""

    mean: float
    median: float
    p95: float
    max: int

    @classmethod
    def of(cls, values: np.ndarray) -> LengthStats:
        if values.size == 0:
            return cls(0.0, 0.0, 0.0, 0)
        return cls(float(values.mean()), float(np.median(values)), float(np.percentile(values, 95)), int(values.max()))


@dataclass
class SavingsEstimate:
    """Token counts of one training epoch over the dataset, stock TRL vs prefix sharing.

    `stock_tokens` is the sum of `input_ids.numel()` of TRL's padded `[2B, L]` batches, `unpadded_tokens` the
    prompt+chosen and prompt+rejected tokens without padding (prompt counted twice), `tokens` what the prefix-shared
    packed rows hold (prompt once; identical chosen/rejected laid out once). `mean_batch_ratio` averages stock/ours
    over batches; `prompt_share` is the prompt's part of `unpadded_tokens`. Length statistics are before truncation;
    `spliced_checked` counts the pairs whose spliced tokenization was checked against TRL's (0: TRL's was used).
    """

    examples: int
    batch_size: int
    batches: int
    stock_tokens: int
    unpadded_tokens: int
    tokens: int
    mean_batch_ratio: float
    prompt: LengthStats
    chosen: LengthStats
    rejected: LengthStats
    prompt_share: float
    conversational: bool
    implicit_prompt: bool
    dropped: int
    truncated: int
    identical: int
    empty_responses: int
    max_length: int | None
    truncation_mode: str
    shuffle: bool
    seed: int
    pad_to_multiple_of: int | None = None
    max_row_tokens: int | None = None
    pad_rows_to_multiple_of: int | None = None
    spliced_checked: int = 0

    @property
    def token_ratio(self) -> float:
        """Stock TRL tokens per prefix-shared token: the upper end of the expected speedup."""
        return self.stock_tokens / max(self.tokens, 1)

    @property
    def sharing_ratio(self) -> float:
        """Unpadded, unshared tokens per prefix-shared token: what prompt sharing alone saves."""
        return self.unpadded_tokens / max(self.tokens, 1)

    @property
    def speedup_range(self) -> tuple[float, float]:
        return (min(self.sharing_ratio, self.token_ratio), self.token_ratio)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(token_ratio=self.token_ratio, sharing_ratio=self.sharing_ratio, speedup_range=self.speedup_range)
        return data


@dataclass
class PairLengths:
    """Per-pair token lengths of a tokenized dataset (kept pairs only, in dataset order).

    `chosen_seq`/`rejected_seq` are the truncated prompt+response lengths of the stock batch, `document` the tokens
    the pair takes in a packed row.
    """

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    chosen_seq: np.ndarray
    rejected_seq: np.ndarray
    prompt_seq: np.ndarray
    document: np.ndarray
    identical: np.ndarray
    conversational: bool
    implicit_prompt: bool
    dropped: int
    max_length: int | None
    truncation_mode: str
    spliced_checked: int = 0

    def __len__(self) -> int:
        return len(self.document)


# -- loading ---------------------------------------------------------------------------------------------------------


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


# -- tokenization (TRL's, batched) -----------------------------------------------------------------------------------


def _tools(example: dict[str, Any]) -> dict[str, Any]:
    """Chat-template kwargs TRL passes per example (`tools`, `chat_template_kwargs`)."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(example.get("chat_template_kwargs") or {})}


def _rows(columns: dict[str, list]) -> Iterator[dict[str, Any]]:
    names = list(columns)
    for values in zip(*(columns[name] for name in names), strict=True):
        yield dict(zip(names, values, strict=True))


def _extract_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """`trl.extract_prompt`, its quirks included, with the common start of two strings found by slice comparisons
    (TRL's loop over characters takes a fifth of the run on long implicit-prompt dialogues)."""
    from trl.data_utils import extract_prompt

    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, str) and isinstance(rejected, str) and chosen and rejected):
        return extract_prompt({"chosen": chosen, "rejected": rejected})
    shortest = min(len(chosen), len(rejected))
    index = _shared_chars(chosen, rejected)
    if index == shortest:  # no differing character: TRL's loop ends on the last index without its space check
        index = shortest - 1
    elif chosen[index - 1] == " ":  # index 0 reads chosen[-1], as TRL does
        index -= 1
    return {"prompt": chosen[:index], "chosen": chosen[index:], "rejected": rejected[index:]}


def _texts(columns: dict[str, list], tokenizer, conversational: bool, implicit: bool) -> tuple[list[str], ...]:
    """Prompts, prompts+chosen and prompts+rejected as the text TRL tokenizes (chat template applied, EOS added)."""
    rows = list(_rows(columns))
    if implicit:
        rows = [{**row, **_extract_prompt(row)} for row in rows]
    if not conversational:
        eos = tokenizer.eos_token or ""
        prompts = [row["prompt"] for row in rows]
        chosen = [row["prompt"] + _with_eos(row["chosen"], eos) for row in rows]
        rejected = [row["prompt"] + _with_eos(row["rejected"], eos) for row in rows]
        return prompts, chosen, rejected
    render = tokenizer.apply_chat_template
    prompts, chosen, rejected = [], [], []
    for row in rows:
        kwargs = _tools(row)
        prompts.append(render(row["prompt"], tokenize=False, add_generation_prompt=True, **kwargs))
        chosen.append(render(row["prompt"] + row["chosen"], tokenize=False, **kwargs))
        rejected.append(render(row["prompt"] + row["rejected"], tokenize=False, **kwargs))
    return prompts, chosen, rejected


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _shared_chars(a: str, b: str) -> int:
    """Length of the common start of two strings (slice comparisons, not a loop over characters)."""
    if b.startswith(a):
        return len(a)
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def split_point(prompt: str, *others: str) -> int:
    """A character index where the text can be cut without changing its tokenization: a space between two
    non-space characters, inside the start that `prompt` shares with every text of `others` (0 if none).

    Regex pre-tokenizers (GPT-2, Llama 3, Qwen, SmolLM byte-level BPE; Metaspace) start a pre-token at such a space,
    so tokens before it do not depend on what follows, and BPE runs per pre-token.
    """
    end = min(_shared_chars(prompt, other) for other in others) - 1
    cut = prompt.rfind(" ", 0, end)
    while cut > 0 and (prompt[cut - 1].isspace() or prompt[cut + 1].isspace()):
        cut = prompt.rfind(" ", 0, cut)
    return max(cut, 0)


class PairEncoder:
    """TRL's three tokenizations of each pair (prompt, prompt+chosen, prompt+rejected), batched.

    TRL tokenizes the prompt three times. Here the text the three share up to a `split_point` is encoded once and
    each remainder on its own, which is the same token sequence for the pre-tokenizers named there and about halves
    the work. In every chunk, `check` pairs spread over it are also tokenized exactly as TRL does; on any difference the
    encoder warns and tokenizes everything the TRL way from then on (as it does with `exact=True`).
    """

    def __init__(self, tokenizer, special_tokens: bool, exact: bool = False, check: int = 8) -> None:
        self.tokenizer = tokenizer
        self.special_tokens = special_tokens
        self.check = check
        self.checked = 0
        self.backend = self._plain_backend() if not exact else None
        self.splice = self.backend is not None and self._special_tokens_in_front()

    def _plain_backend(self):
        """A private copy of the fast tokenizer's backend, set up as `tokenizer(texts)` sets it before encoding.

        The backend keeps padding/truncation state from its file or from earlier calls (a tokenizer.json may pad
        and truncate to a fixed length), which `tokenizer(...)` resets on every call; the copy is reset once.
        """
        if not getattr(self.tokenizer, "is_fast", False):
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(getattr(self.tokenizer, "split_special_tokens", False))
        return backend

    def _special_tokens_in_front(self) -> bool:
        """Special tokens the tokenizer adds (if any) all go in front, so the encoded head can carry them."""
        if not self.special_tokens:
            return True
        probe = "splice probe"
        with_special, bare = self._exact([probe])[0], self._encode([probe], special=False)[0]
        return with_special[len(with_special) - len(bare) :] == bare

    def _exact(self, texts: list[str]) -> list[list[int]]:
        """`tokenizer(text)` as TRL calls it (`add_special_tokens` on for plain text, off after a chat template)."""
        return self.tokenizer(texts, add_special_tokens=self.special_tokens)["input_ids"]

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=special)]

    def _spliced(self, texts: tuple[list[str], ...]) -> list[list[list[int]]]:
        cuts = [split_point(*group) for group in zip(*texts, strict=True)]
        heads = self._encode([prompt[:cut] for prompt, cut in zip(texts[0], cuts, strict=True)], self.special_tokens)
        tails = [[text[cut:] for text, cut in zip(column, cuts, strict=True)] for column in texts]
        encoded = self._encode([tail for column in tails for tail in column], special=False)
        n = len(cuts)
        return [[heads[i] + encoded[c * n + i] for i in range(n)] for c in range(len(texts))]

    def __call__(self, texts: tuple[list[str], ...]) -> list[list[list[int]]]:
        """Token ids of each column of `texts` (prompts, prompts+chosen, prompts+rejected)."""
        n = len(texts[0])
        if self.splice:
            spliced = self._spliced(texts)
            sample = list(range(0, n, max(n // self.check, 1)))[: self.check]
            exact = self._exact([column[i] for column in texts for i in sample])
            k = len(sample)
            if all(spliced[c][i] == exact[c * k + j] for c in range(len(texts)) for j, i in enumerate(sample)):
                self.checked += k
                return spliced
            print(
                "[trl-prefix-share] splitting the text at a space changes this tokenizer's tokens: tokenizing every "
                "pair the TRL way from here (slower)",
                file=sys.stderr,
            )
            self.splice = False
        flat = self._exact([text for column in texts for text in column])
        return [flat[c * n : (c + 1) * n] for c in range(len(texts))]


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Leading tokens `a` and `b` share, at most `limit` (one slice comparison in the usual, equal case)."""
    limit = min(limit, len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    length = 0
    while a[length] == b[length]:
        length += 1
    return length


def _truncate(ids: list[int], max_length: int | None, mode: str) -> list[int]:
    if max_length is None or len(ids) <= max_length:
        return ids
    return ids[:max_length] if mode == "keep_start" else ids[-max_length:]


def _completion_start(prompt: int, full: int, kept: int, mode: str) -> int:
    """Index of the first completion token in a truncated sequence (its length when no completion token is left):
    where the collator's `completion_mask` starts, so where `layout.shareable_length` stops."""
    cut_in_front = full - kept if mode == "keep_end" else 0
    return min(max(prompt - cut_in_front, 0), kept)


def _pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int | None, mode: str
) -> tuple[int, int, int, int, int, int, int, bool]:
    """One pair's lengths: as `DataCollatorForPreference` truncates it, and as `layout.make_document` lays it out.

    `chosen_ids`/`rejected_ids` are the full prompt+response tokenizations. Returns (prompt, chosen, rejected)
    lengths, the truncated sequence lengths, the truncated prompt length, the document length and whether chosen and
    rejected are identical (then scored from one branch).
    """
    prompt = min(
        _common_prefix(prompt_ids, chosen_ids, len(prompt_ids)),
        _common_prefix(prompt_ids, rejected_ids, len(prompt_ids)),
    )
    seq_c, seq_r = _truncate(chosen_ids, max_length, mode), _truncate(rejected_ids, max_length, mode)
    start_c = _completion_start(prompt, len(chosen_ids), len(seq_c), mode)
    start_r = _completion_start(prompt, len(rejected_ids), len(seq_r), mode)
    shared = _common_prefix(seq_c, seq_r, min(start_c, start_r))
    head = shared - 1 if shared >= 2 else 0
    identical = start_c == start_r and seq_c == seq_r
    document = len(seq_c) if identical else len(seq_c) + len(seq_r) - head
    prompt_seq = start_c + start_r
    return (
        prompt,
        len(chosen_ids) - prompt,
        len(rejected_ids) - prompt,
        len(seq_c),
        len(seq_r),
        prompt_seq,
        document,
        identical,
    )


def tokenize_pairs(
    dataset,
    tokenizer,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    progress: bool = False,
    exact: bool = False,
    chunk_size: int = CHUNK,
) -> PairLengths:
    """Tokenize a preference dataset as TRL's DPOTrainer does and keep only the lengths the counts need."""
    from tqdm import tqdm
    from trl.data_utils import extract_prompt, is_conversational

    if isinstance(dataset, list | tuple):
        from datasets import Dataset

        dataset = Dataset.from_list(list(dataset))
    missing = {"chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"The dataset lacks the preference column(s) {sorted(missing)} (columns: {dataset.column_names})."
        )
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    implicit = "prompt" not in dataset.column_names
    first = dataset[0]
    conversational = is_conversational(extract_prompt(first) if implicit else first)
    wanted = [c for c in ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs") if c in dataset.column_names]
    encoder = PairEncoder(tokenizer, special_tokens=not conversational, exact=exact)
    records: list[tuple] = []
    bar = tqdm(total=len(dataset), desc="tokenizing", unit="ex", file=sys.stderr, disable=not progress)
    for columns in dataset.select_columns(wanted).iter(batch_size=chunk_size):
        prompts, chosen, rejected = encoder(_texts(columns, tokenizer, conversational, implicit))
        records.extend(
            _pair(p, c, r, max_length, truncation_mode) for p, c, r in zip(prompts, chosen, rejected, strict=True)
        )
        bar.update(len(prompts))
    bar.close()
    pairs = _collect(records, conversational, implicit, max_length, truncation_mode)
    pairs.spliced_checked = encoder.checked if encoder.splice else 0
    return pairs


def _collect(
    records: list[tuple], conversational: bool, implicit: bool, max_length: int | None, truncation_mode: str
) -> PairLengths:
    """Arrays of the kept pairs: TRL drops a pair whose prompt alone fills `max_length` under `keep_start`."""
    table = np.array(records, dtype=np.int64).reshape(-1, 8)
    keep = np.ones(len(table), dtype=bool)
    if max_length is not None and truncation_mode == "keep_start":
        keep = table[:, 0] < max_length
    table = table[keep]
    return PairLengths(
        prompt=table[:, 0],
        chosen=table[:, 1],
        rejected=table[:, 2],
        chosen_seq=table[:, 3],
        rejected_seq=table[:, 4],
        prompt_seq=table[:, 5],
        document=table[:, 6],
        identical=table[:, 7].astype(bool),
        conversational=conversational,
        implicit_prompt=implicit,
        dropped=int((~keep).sum()),
        max_length=max_length,
        truncation_mode=truncation_mode,
    )


# -- batching and counting -------------------------------------------------------------------------------------------


def _round_up(value: np.ndarray, multiple: int | None) -> np.ndarray:
    if not multiple or multiple <= 1:
        return value
    return -(-value // multiple) * multiple


def sampler_order(num_examples: int, shuffle: bool, seed: int) -> np.ndarray:
    """The Trainer's first-epoch order: accelerate's seedable sampler draws `torch.randperm` seeded with `seed`."""
    if not shuffle:
        return np.arange(num_examples)
    import torch

    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).numpy()


def _packed_tokens(documents: np.ndarray, max_row_tokens: int | None, pad_rows_to_multiple_of: int | None) -> int:
    """Tokens of one batch's packed rows (`pack_documents`): rows x the longest row, rounded up."""
    rows = assign_rows(documents.tolist(), max_row_tokens)
    longest = max(int(documents[row].sum()) for row in rows)
    return len(rows) * int(_round_up(np.int64(longest), pad_rows_to_multiple_of))


def count_tokens(
    pairs: PairLengths,
    batch_size: int = 8,
    shuffle: bool = True,
    seed: int = 42,
    pad_to_multiple_of: int | None = None,
    max_row_tokens: int | None = None,
    pad_rows_to_multiple_of: int | None = None,
) -> SavingsEstimate:
    """Sum stock and prefix-shared tokens over the batches of one epoch (the last batch may be short, as in TRL)."""
    order = sampler_order(len(pairs), shuffle, seed)
    starts = np.arange(0, len(order), batch_size)
    stock = unpadded = ours = 0
    ratios = []
    if len(order):
        longest = np.maximum(pairs.chosen_seq, pairs.rejected_seq)[order]
        sizes = np.diff(np.append(starts, len(order)))
        stock_batches = 2 * sizes * _round_up(np.maximum.reduceat(longest, starts), pad_to_multiple_of)
        documents = pairs.document[order]
        ours_batches = np.array(
            [_packed_tokens(documents[s : s + batch_size], max_row_tokens, pad_rows_to_multiple_of) for s in starts]
        )
        stock, ours = int(stock_batches.sum()), int(ours_batches.sum())
        unpadded = int(pairs.chosen_seq.sum() + pairs.rejected_seq.sum())
        ratios = stock_batches / ours_batches
    return SavingsEstimate(
        examples=len(pairs),
        batch_size=batch_size,
        batches=len(starts),
        stock_tokens=stock,
        unpadded_tokens=unpadded,
        tokens=ours,
        mean_batch_ratio=float(np.mean(ratios)) if len(ratios) else 0.0,
        prompt=LengthStats.of(pairs.prompt),
        chosen=LengthStats.of(pairs.chosen),
        rejected=LengthStats.of(pairs.rejected),
        prompt_share=float(pairs.prompt_seq.sum()) / max(unpadded, 1),
        conversational=pairs.conversational,
        implicit_prompt=pairs.implicit_prompt,
        dropped=pairs.dropped,
        truncated=int(
            (
                (pairs.chosen_seq < pairs.prompt + pairs.chosen) | (pairs.rejected_seq < pairs.prompt + pairs.rejected)
            ).sum()
        ),
        identical=int(pairs.identical.sum()),
        empty_responses=int(((pairs.chosen == 0) | (pairs.rejected == 0)).sum()),
        max_length=pairs.max_length,
        truncation_mode=pairs.truncation_mode,
        shuffle=shuffle,
        seed=seed,
        pad_to_multiple_of=pad_to_multiple_of,
        max_row_tokens=max_row_tokens,
        pad_rows_to_multiple_of=pad_rows_to_multiple_of,
        spliced_checked=pairs.spliced_checked,
    )


def estimate_savings(
    dataset,
    tokenizer,
    batch_size: int = 8,
    max_length: int | None = 1024,
    max_row_tokens: int | None = None,
    truncation_mode: str = "keep_start",
    pad_to_multiple_of: int | None = None,
    pad_rows_to_multiple_of: int | None = None,
    shuffle: bool = True,
    seed: int = 42,
    progress: bool = False,
    exact_tokenization: bool = False,
) -> SavingsEstimate:
    """Tokens stock TRL's DPOTrainer would run on `dataset` in one epoch vs `PrefixSharedDPOTrainer`.

    `dataset`: a `datasets.Dataset`, a list of example dicts, or a file / hub name; `tokenizer`: a tokenizer or its
    name / directory. The other arguments mean what the `DPOConfig` / `PrefixSharedDPOConfig` fields of the same
    names mean (`batch_size` is `per_device_train_batch_size`; `seed` is `seed`, or `data_seed` when set).
    """
    if isinstance(dataset, str | Path):
        dataset = load_preference_dataset(str(dataset))
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(str(tokenizer))
    pairs = tokenize_pairs(dataset, tokenizer, max_length, truncation_mode, progress, exact_tokenization)
    return count_tokens(pairs, batch_size, shuffle, seed, pad_to_multiple_of, max_row_tokens, pad_rows_to_multiple_of)


# -- report ----------------------------------------------------------------------------------------------------------


def _format_lengths(estimate: SavingsEstimate) -> list[str]:
    lines = [f"{'tokens per pair':<24}{'mean':>9}{'median':>9}{'p95':>9}{'max':>9}   (before truncation)"]
    for name in ("prompt", "chosen", "rejected"):
        stats: LengthStats = getattr(estimate, name)
        lines.append(f"  {name:<22}{stats.mean:>9.1f}{stats.median:>9.0f}{stats.p95:>9.0f}{stats.max:>9,}")
    lines.append(f"  prompt share of the unpadded tokens: {estimate.prompt_share:.0%}")
    return lines


def _format_counts(estimates: Sequence[SavingsEstimate]) -> list[str]:
    header = (
        f"{'batch':>5}{'batches':>9}{'stock TRL':>15}{'unpadded':>15}{'prefix-shared':>15}"
        f"{'stock/ours':>12}{'batch mean':>12}{'unpadded/ours':>15}   expected speedup"
    )
    lines = [header]
    for e in estimates:
        low, high = e.speedup_range
        lines.append(
            f"{e.batch_size:>5}{e.batches:>9,}{e.stock_tokens:>15,}{e.unpadded_tokens:>15,}{e.tokens:>15,}"
            f"{e.token_ratio:>11.2f}x{e.mean_batch_ratio:>11.2f}x{e.sharing_ratio:>14.2f}x   {low:.2f}x - {high:.2f}x"
        )
    return lines


def _format_notes(estimate: SavingsEstimate) -> list[str]:
    notes = []
    if estimate.dropped:
        notes.append(f"{estimate.dropped:,} pair(s) dropped, as TRL does: the prompt alone fills max_length")
    if estimate.truncated:
        notes.append(f"{estimate.truncated:,} pair(s) truncated at max_length={estimate.max_length}")
    if estimate.identical:
        notes.append(f"{estimate.identical:,} pair(s) with identical chosen and rejected: laid out once")
    if estimate.empty_responses:
        notes.append(
            f"{estimate.empty_responses:,} pair(s) with an empty response: prefix sharing refuses them unless "
            "drop_invalid_examples=True (they are counted above)"
        )
    return [f"  - {note}" for note in notes]


def format_report(estimates: Sequence[SavingsEstimate], title: str) -> str:
    """The table `trl-prefix-share estimate` prints (one row of counts per batch size)."""
    first = estimates[0]
    kind = ("conversational" if first.conversational else "plain text") + (
        ", implicit prompt" if first.implicit_prompt else ""
    )
    order = f"shuffled with seed {first.seed}" if first.shuffle else "in dataset order"
    truncation = "no truncation" if first.max_length is None else f"max_length {first.max_length}"
    if first.max_length is not None and first.truncation_mode != "keep_start":
        truncation += f" ({first.truncation_mode})"
    for name in ("pad_to_multiple_of", "max_row_tokens", "pad_rows_to_multiple_of"):
        if getattr(first, name) is not None:
            truncation += f", {name} {getattr(first, name)}"
    lines = [
        f"{title}",
        f"{first.examples:,} pairs ({kind}); {truncation}; batches {order}",
        "",
        *_format_lengths(first),
        "",
        "tokens in one epoch (stock TRL: padded [2B, L] batches; unpadded: prompt twice; prefix-shared: ours)",
        *_format_counts(estimates),
        "",
        SPEEDUP_NOTE,
    ]
    notes = _format_notes(first)
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


# -- command ---------------------------------------------------------------------------------------------------------


def _optional_int(value: str) -> int | None:
    return None if value.lower() in {"none", "null", "0"} else int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-prefix-share estimate",
        description="Tokens stock TRL's DPOTrainer would process on a preference dataset vs prefix sharing, and the "
        "speedup to expect. No model is loaded.",
    )
    parser.add_argument("--dataset", required=True, help="a .jsonl/.json/.parquet/.csv file or a hub dataset name")
    parser.add_argument("--dataset-config", default=None, help="hub dataset configuration name")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer name or directory (the model's)")
    parser.add_argument(
        "--batch-size", type=int, nargs="+", default=[8], help="per-device train batch size(s) (default: 8)"
    )
    parser.add_argument("--max-length", type=_optional_int, default=1024, help="TRL's max_length; none: no limit")
    parser.add_argument("--truncation-mode", choices=["keep_start", "keep_end"], default="keep_start")
    parser.add_argument("--pad-to-multiple-of", type=_optional_int, default=None, help="TRL's pad_to_multiple_of")
    parser.add_argument("--max-row-tokens", type=_optional_int, default=None, help="token budget of a packed row")
    parser.add_argument(
        "--pad-rows-to-multiple-of",
        type=_optional_int,
        default=None,
        help="pad packed rows to a multiple of this (the trainer uses 128 on CUDA by default; none on CPU)",
    )
    parser.add_argument("--seed", type=int, default=42, help="the Trainer's seed (or data_seed) for the shuffle")
    parser.add_argument("--no-shuffle", action="store_true", help="batches in dataset order")
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples")
    parser.add_argument(
        "--sample", type=int, default=None, help="N examples drawn at random (seeded): ratios hold, totals shrink"
    )
    parser.add_argument(
        "--exact-tokenization", action="store_true", help="tokenize the prompt three times as TRL does (slower)"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_estimate(argv: list[str]) -> None:
    """The `estimate` command: tokenize once, count for each batch size, print the table (and write JSON)."""
    args = build_parser().parse_args(argv)
    if args.no_progress:
        from datasets import disable_progress_bars

        disable_progress_bars()
    dataset = load_preference_dataset(args.dataset, args.split, args.dataset_config)
    title = f"trl-prefix-share estimate: {args.dataset} with tokenizer {args.tokenizer}"
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    if args.sample is not None and args.sample < len(dataset):
        title += f" (random sample of {args.sample:,} of {len(dataset):,} examples)"
        picked = np.random.default_rng(args.seed).choice(len(dataset), args.sample, replace=False)
        dataset = dataset.select(np.sort(picked))
    tokenizer = load_tokenizer(args.tokenizer)
    pairs = tokenize_pairs(
        dataset, tokenizer, args.max_length, args.truncation_mode, not args.no_progress, args.exact_tokenization
    )
    estimates = [
        count_tokens(
            pairs,
            batch_size,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            pad_to_multiple_of=args.pad_to_multiple_of,
            max_row_tokens=args.max_row_tokens,
            pad_rows_to_multiple_of=args.pad_rows_to_multiple_of,
        )
        for batch_size in args.batch_size
    ]
    print(format_report(estimates, title))
    if args.json:
        payload = {"dataset": args.dataset, "tokenizer": args.tokenizer, "estimates": [e.to_dict() for e in estimates]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
