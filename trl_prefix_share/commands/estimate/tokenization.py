"""TRL 1.16's DPO tokenization of preference pairs, batched, reduced to the token lengths the counts need."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from trl_prefix_share.commands.estimate.results import PairLengths

CHUNK = 1000


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
) -> tuple[tuple[int, int, int, int, int, int, int, bool], tuple[bytes, bytes], tuple[bytes, bytes], bytes]:
    """One pair's lengths: as `DataCollatorForPreference` truncates it, and as `layout.make_document` lays it out;
    with the prompt tokens of its truncated chosen and rejected sequences (what a prefix tree may share), digests of
    those two sequences (which are identical, for `group_by_prompt`) and a digest of the prompt (its sampler key).

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
    lengths = (
        prompt,
        len(chosen_ids) - prompt,
        len(rejected_ids) - prompt,
        len(seq_c),
        len(seq_r),
        prompt_seq,
        document,
        identical,
    )
    digests = (digest(seq_c[:start_c], seq_c), digest(seq_r[:start_r], seq_r))
    return lengths, (prompt_bytes(seq_c[:start_c]), prompt_bytes(seq_r[:start_r])), digests, digest(prompt_ids)


def digest(*parts: list[int]) -> bytes:
    """A short fingerprint of token lists (equal lists, equal digests; 16 bytes whatever their length)."""
    hasher = hashlib.blake2b(digest_size=16)
    for tokens in parts:
        hasher.update(prompt_bytes(tokens))
        hasher.update(b"|")
    return hasher.digest()


def prompt_bytes(tokens: list[int]) -> bytes:
    """A sequence's prompt tokens as bytes (4 per token): compact, and sortable for counting common prefixes."""
    return np.asarray(tokens, dtype=">u4").tobytes()


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
    table = np.array([record[0] for record in records], dtype=np.int64).reshape(-1, 8)
    keep = np.ones(len(table), dtype=bool)
    if max_length is not None and truncation_mode == "keep_start":
        keep = table[:, 0] < max_length
    table = table[keep]
    kept = [record for record, flag in zip(records, keep.tolist(), strict=True) if flag]
    return PairLengths(
        prompt_tokens=[record[1] for record in kept],
        sequence_digests=[record[2] for record in kept],
        prompt_keys=[record[3] for record in kept],
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
