"""Unlearning data: readers, validation, tokenisation, the packed-batch collator and the sampler.

An example is one harmful prompt with one harmless response and K >= 1 harmful responses. Readers
turn every source into ``Example`` rows and raise ``DataError`` (one line naming the file and row)
on the first bad row, before anything is trained or written.
"""
import json
import os
import random
from dataclasses import dataclass

import torch


class DataError(ValueError):
    """Bad user data: the message names the file, the row and what is wrong."""


@dataclass
class Example:
    example_id: int
    prompt: str
    harmless: str
    harmful: list


@dataclass
class EncodedPair:
    input_ids: list
    prompt_length: int  # the first prompt_length tokens are the prompt (with BOS), the rest the response
    truncated: bool = False  # the response was cut to fit max_length


@dataclass
class EncodedExample:
    example_id: int
    positive: EncodedPair
    negatives: list  # of EncodedPair


# --- readers ---------------------------------------------------------------------------------

def jsonl_rows(path: str) -> list:
    """``(where, row)`` for every non-blank line of a JSONL file, ``where`` being "path:line" for
    messages. A missing file, a line that is not JSON and a file without rows are DataErrors."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_jsonl(path: str) -> list:
    """Rows ``{"prompt": str, "harmless": str, "harmful": [str, ...]}``, one JSON object a line."""
    return [_validate_row(row, where, i) for i, (where, row) in enumerate(jsonl_rows(path))]


def examples_from_rows(rows: list, source: str) -> list:
    """Validated examples from in-memory rows of the JSONL schema (e.g. the toy world's)."""
    return [_validate_row(row, f"{source} row {i + 1}", i) for i, row in enumerate(rows)]


def _validate_row(row, where: str, example_id: int) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object with prompt, harmless and harmful")
    for name in ("prompt", "harmless", "harmful"):
        if name not in row:
            raise DataError(f"{where}: missing field '{name}'")
    for name in ("prompt", "harmless"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise DataError(f"{where}: field '{name}' must be a non-empty string")
    harmful = row["harmful"]
    if not isinstance(harmful, list) or not harmful:
        raise DataError(f"{where}: field 'harmful' must be a non-empty list of strings")
    for k, text in enumerate(harmful):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: harmful[{k}] must be a non-empty string")
    return Example(example_id, row["prompt"], row["harmless"], list(harmful))


PKU_FIELDS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe")


def read_pku_saferlhf(source: str, split: str = "train") -> tuple:
    """Rows in the PKU-SafeRLHF schema, from the hub name or a local json/jsonl/parquet/csv file,
    through ``datasets``. Rows are grouped by prompt: every unsafe response is a harmful response,
    the first safe one the harmless response. Prompts lacking either are skipped.
    Returns (examples, number of prompts skipped)."""
    import datasets
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1].lstrip(".")
        builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
        if builder is None:
            raise DataError(f"{source}: unsupported file type '.{ext}' (json, jsonl, parquet, csv)")
        table = datasets.load_dataset(builder, data_files=source, split="train")
    elif source.endswith((".json", ".jsonl", ".parquet", ".csv")):
        raise DataError(f"{source}: no such file")
    else:  # a hub name ("org/name") or a local dataset directory
        table = datasets.load_dataset(source, split=split)
    missing = [f for f in PKU_FIELDS if f not in table.column_names]
    if missing:
        raise DataError(f"{source}: not in the PKU-SafeRLHF schema, missing column(s) {', '.join(missing)}")
    grouped: dict = {}
    for row_no, row in enumerate(table, start=1):
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{source}: row {row_no}: field 'prompt' must be a non-empty string")
        entry = grouped.setdefault(prompt, {"harmless": None, "harmful": []})
        for r in (0, 1):
            text = row[f"response_{r}"]
            if not isinstance(text, str) or not text.strip():
                continue
            if row[f"is_response_{r}_safe"]:
                entry["harmless"] = entry["harmless"] or text
            elif text not in entry["harmful"]:
                entry["harmful"].append(text)
    examples, skipped = [], 0
    for prompt, entry in grouped.items():
        if entry["harmless"] is None or not entry["harmful"]:
            skipped += 1
            continue
        examples.append(Example(len(examples), prompt, entry["harmless"], entry["harmful"]))
    if not examples:
        raise DataError(f"{source}: no prompt has both a safe and an unsafe response")
    return examples, skipped


def detect_format(path: str) -> str:
    """'jsonl' or 'pku' from the first row of a local file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (or pass --data_format pku for a hub dataset name)")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                return "pku" if isinstance(row, dict) and "response_0" in row else "jsonl"
    raise DataError(f"{path}: no rows")


# --- tokenisation ----------------------------------------------------------------------------

def encode_pair(tokenizer, prompt_text: str, response: str, max_length: int) -> EncodedPair:
    """Token ids of ``prompt_text`` + " " + ``response`` + EOS, the response cut to fit max_length."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max(0, max_length - len(prompt_ids))
    return EncodedPair(prompt_ids + response_ids[:room], len(prompt_ids), truncated=len(response_ids) > room)


def encode_examples(examples: list, tokenizer, prompt_format: str, max_length: int,
                    overlong: str = "error", source: str = "data") -> tuple:
    """Encode every example. A prompt that leaves no room for a response within ``max_length`` is an
    error (``overlong="error"``) or dropped (``"drop"``); responses longer than the room left are
    truncated. Returns (encoded examples, number dropped, number of responses truncated)."""
    encoded, dropped, truncated = [], 0, 0
    for ex in examples:
        prompt_text = prompt_format.format(prompt=ex.prompt)
        pairs = [encode_pair(tokenizer, prompt_text, r, max_length) for r in [ex.harmless] + ex.harmful]
        if pairs[0].prompt_length >= max_length:
            if overlong == "drop":
                dropped += 1
                continue
            raise DataError(f"{source}: example {ex.example_id + 1}: prompt is {pairs[0].prompt_length} "
                            f"tokens, no room for a response within --max_length {max_length} "
                            f"(raise --max_length, or pass --overlong drop)")
        truncated += sum(pair.truncated for pair in pairs)
        encoded.append(EncodedExample(ex.example_id, pairs[0], pairs[1:]))
    return encoded, dropped, truncated


# --- batching --------------------------------------------------------------------------------

def pack_batch(batch: list, pad_id: int, extra_rows: dict | None = None) -> dict:
    """One padded batch holding every sequence of the micro-batch: B positives first, then all
    negatives, then any ``extra_rows`` groups (name -> list of EncodedPair: normal data, random answers,
    generated anchors), so that a single forward pass serves the whole loss.

    Keys: input_ids/attention_mask [S,T]; response_mask [S,T] (response tokens); labels [S,T] (the
    response tokens, -100 elsewhere); prompt_mask [B,T] (prompt tokens of the positive rows);
    negative_rows [B,K] (row of each negative in the packed batch) and negative_mask [B,K];
    example_ids [B]; and ``<name>_rows`` [n] for each extra group."""
    extra_rows = extra_rows or {}
    pairs = [e.positive for e in batch] + [n for e in batch for n in e.negatives]
    for group in extra_rows.values():
        pairs += group
    length = max(len(p.input_ids) for p in pairs)
    num_rows = len(pairs)
    input_ids = torch.full((num_rows, length), pad_id, dtype=torch.long)
    attention = torch.zeros((num_rows, length), dtype=torch.long)
    response = torch.zeros((num_rows, length), dtype=torch.long)
    for row, p in enumerate(pairs):
        n = len(p.input_ids)
        input_ids[row, :n] = torch.tensor(p.input_ids)
        attention[row, :n] = 1
        response[row, p.prompt_length:n] = 1
    batch_size = len(batch)
    prompt = attention[:batch_size] - response[:batch_size]
    max_neg = max(len(e.negatives) for e in batch)
    negative_rows = torch.zeros((batch_size, max_neg), dtype=torch.long)
    negative_mask = torch.zeros((batch_size, max_neg), dtype=torch.bool)
    row = batch_size
    for i, e in enumerate(batch):
        for k in range(len(e.negatives)):
            negative_rows[i, k], negative_mask[i, k] = row, True
            row += 1
    packed = {"input_ids": input_ids, "attention_mask": attention, "response_mask": response,
              "labels": input_ids.masked_fill(response == 0, -100), "prompt_mask": prompt,
              "negative_rows": negative_rows, "negative_mask": negative_mask,
              "example_ids": torch.tensor([e.example_id for e in batch], dtype=torch.long)}
    for name, group in extra_rows.items():
        packed[f"{name}_rows"] = torch.arange(row, row + len(group), dtype=torch.long)
        row += len(group)
    return packed


def lm_batch(pairs: list, pad_id: int) -> dict:
    """Right-padded causal-LM batch of EncodedPairs; labels cover the response tokens only."""
    length = max(len(p.input_ids) for p in pairs)
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, p in enumerate(pairs):
        n = len(p.input_ids)
        input_ids[row, :n] = torch.tensor(p.input_ids)
        attention[row, :n] = 1
        labels[row, p.prompt_length:n] = input_ids[row, p.prompt_length:n]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# --- normal data -----------------------------------------------------------------------------

def read_normal_jsonl(path: str) -> list:
    """Normal (retain) data: rows ``{"prompt": str, "response": str}`` and optionally ``"answer"``
    (a word the response must contain, for task accuracy). Returns the rows as dicts."""
    rows = []
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a JSON object with prompt and response")
        for name in ("prompt", "response"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise DataError(f"{where}: field '{name}' must be a non-empty string")
        rows.append(row)
    return rows


def encode_normal(rows: list, tokenizer, prompt_format: str, max_length: int) -> list:
    """EncodedPairs of normal rows; rows whose prompt leaves no room for a response are skipped."""
    pairs = [encode_pair(tokenizer, prompt_format.format(prompt=r["prompt"]), r["response"], max_length)
             for r in rows]
    return [p for p in pairs if p.prompt_length < len(p.input_ids)]


class BatchMaker:
    """Builds a step's packed batch for the method: the examples' positives and negatives, plus the
    extra row groups the method asks for (methods.extra_row_groups):
    - ``normal``: as many random normal-data rows as examples (retain and KL terms);
    - ``random``: each harmful prompt paired with a random normal response (GA's L_rand);
    - ``anchor``: each prompt with the model's own continuation (WPN's --anchor generation; set by
      ``set_anchors``).
    Random draws are seeded by (seed, step, micro-batch, rank), so a resumed run draws the same rows."""

    def __init__(self, encoded: list, examples: list, tokenizer, prompt_format: str, max_length: int,
                 groups: tuple, normal_rows: list | None, seed: int):
        self.encoded, self.tokenizer, self.groups, self.seed = encoded, tokenizer, groups, seed
        self.prompt_format, self.max_length = prompt_format, max_length
        self.examples = {e.example_id: e for e in examples}
        self.normal_rows = normal_rows or []
        self.normal_pairs = encode_normal(self.normal_rows, tokenizer, prompt_format, max_length)
        if ("normal" in groups or "random" in groups) and not self.normal_pairs:
            raise DataError("this method needs normal data (--normal_data), and none was given")
        self.anchors: dict = {}

    def set_anchors(self, continuations: dict) -> None:
        """example id -> the model's continuation of its prompt (text)."""
        self.anchors = {i: encode_pair(self.tokenizer, self.prompt_text(i), text, self.max_length)
                        for i, text in continuations.items()}

    def prompt_text(self, example_id: int) -> str:
        return self.prompt_format.format(prompt=self.examples[example_id].prompt)

    def make(self, indices: list, step: int, micro: int, rank: int) -> dict:
        batch = [self.encoded[i] for i in indices]
        rng = random.Random(f"{self.seed}-{step}-{micro}-{rank}")
        extra = {}
        for group in self.groups:
            if group == "normal":
                extra[group] = [rng.choice(self.normal_pairs) for _ in batch]
            elif group == "random":
                extra[group] = [encode_pair(self.tokenizer, self.prompt_text(e.example_id),
                                            rng.choice(self.normal_rows)["response"], self.max_length) for e in batch]
            elif group == "anchor":
                extra[group] = [self.anchors[e.example_id] for e in batch]
        return pack_batch(batch, self.tokenizer.pad_token_id, extra)


class ShardedSampler:
    """Deterministic per-epoch shuffle, padded by repetition to a multiple of the global batch and
    split across ranks. The padding copies keep their example ids, so the loss counts them once.

    ``micro_batches(epoch)`` gives this rank's micro-batches (lists of example indices) for an epoch;
    a resumed run skips the ones already consumed."""

    def __init__(self, num_examples: int, micro_batch_size: int, rank: int, world_size: int, seed: int):
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def micro_batches_per_epoch(self) -> int:
        per_step = self.micro_batch_size * self.world_size
        return -(-self.num_examples // per_step)

    def micro_batches(self, epoch: int) -> list:
        order = list(range(self.num_examples))
        random.Random(self.seed * 100003 + epoch).shuffle(order)
        per_step = self.micro_batch_size * self.world_size
        total = self.micro_batches_per_epoch() * per_step
        while len(order) < total:  # pad by repetition
            order += order[: total - len(order)]
        mine = order[self.rank::self.world_size]
        return [mine[i:i + self.micro_batch_size] for i in range(0, len(mine), self.micro_batch_size)]
