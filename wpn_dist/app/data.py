"""Unlearning data: readers, validation, tokenisation, the packed-batch collator and the sampler.

An example is one harmful prompt with one harmless response and K >= 1 harmful responses. Readers
turn every source into ``Example`` rows and raise ``DataError`` (one line naming the file and row)
on the first bad row, before anything is trained or written.
"""
import json
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch


class DataError(ValueError):
    """Bad user data: the message names the file, the row and what is wrong."""


@dataclass
class Example:
    example_id: int
    prompt: str
    harmless: str
    harmful: list
    group: Optional[str] = None  # rows of one group stay on one side of the tamper term's attack split


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
    """Rows ``{"prompt": str, "harmless": str, "harmful": [str, ...]}`` with an optional ``"group": str`` (a
    subject shared by rows, for WPN's tamper term), one JSON object a line."""
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
    group = row.get("group")
    if group is not None and (not isinstance(group, str) or not group.strip()):
        raise DataError(f"{where}: field 'group', when given, must be a non-empty string")
    return Example(example_id, row["prompt"], row["harmless"], list(harmful), group)


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


def read_examples(path: str, data_format: str, split: str = "train") -> tuple:
    """The examples of a local file or dataset directory, in ``data_format`` ('auto' tells JSONL from
    PKU-SafeRLHF by the first row). Returns (examples, the format read, prompts skipped)."""
    fmt = detect_format(path) if data_format == "auto" else data_format
    if fmt == "jsonl":
        return read_jsonl(path), fmt, 0
    examples, skipped = read_pku_saferlhf(path, split)
    return examples, fmt, skipped


def detect_format(path: str) -> str:
    """'jsonl' or 'pku' from the first row of a local file; a directory (a dataset on disk, or a hub
    dataset's snapshot) is read by ``datasets`` in the PKU-SafeRLHF schema."""
    if os.path.isdir(path):
        return "pku"
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

def _cut(prompt_ids: list, response_ids: list, max_length: int) -> EncodedPair:
    """Prompt + response ids, the response cut to fit max_length."""
    room = max(0, max_length - len(prompt_ids))
    return EncodedPair(prompt_ids + response_ids[:room], len(prompt_ids), truncated=len(response_ids) > room)


def encode_pair(tokenizer, prompt_text: str, response: str, max_length: int) -> EncodedPair:
    """Token ids of ``prompt_text`` + " " + ``response`` + EOS, the response cut to fit max_length."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return _cut(prompt_ids, response_ids, max_length)


def tokenize_examples(examples: list, tokenizer, prompt_format: str) -> list:
    """Per example, its prompt's ids and the ids of " " + each response + EOS (the harmless one
    first), untruncated: what encode_pair tokenises, in batched tokenizer calls (fast on a large data
    set). encode_examples cuts them to a max_length; token_lengths reports them before it is chosen."""
    prompts = [prompt_format.format(prompt=ex.prompt) for ex in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
    texts = [" " + r for ex in examples for r in [ex.harmless] + ex.harmful]
    flat = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out, start = [], 0
    for ex, ids in zip(examples, prompt_ids):
        count = 1 + len(ex.harmful)
        out.append((ids, [r + [tokenizer.eos_token_id] for r in flat[start:start + count]]))
        start += count
    return out


@dataclass
class LengthReport:
    """Token lengths (prompt + response + EOS) of every pair of a data set, untruncated."""
    lengths: list

    def percentile(self, q: float) -> int:
        ordered = sorted(self.lengths)
        return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * q // 100) - 1))] if ordered else 0

    def truncated_at(self, max_length: int) -> int:
        return sum(n > max_length for n in self.lengths)

    def default_max_length(self, context: int) -> int:
        """The 99th percentile rounded up to a multiple of 64, within the model's context: at most 1% of
        the responses are cut, and a few very long rows do not set every batch's size."""
        return max(64, min(context, -(-self.percentile(99) // 64) * 64))

    def describe(self, max_length: int) -> str:
        return (f"token lengths (prompt + response) of {len(self.lengths)} pairs: median {self.percentile(50)}, "
                f"p90 {self.percentile(90)}, p99 {self.percentile(99)}, max {max(self.lengths, default=0)}; "
                f"{self.truncated_at(max_length)} responses longer than --max_length {max_length} are truncated")


def token_lengths(tokenized: list) -> LengthReport:
    """The lengths of tokenize_examples' pairs."""
    return LengthReport([len(prompt) + len(response) for prompt, responses in tokenized for response in responses])


def encode_examples(examples: list, tokenizer, prompt_format: str, max_length: int,
                    overlong: str = "error", source: str = "data", tokenized: list | None = None) -> tuple:
    """Encode every example (``tokenized``: tokenize_examples' output, when already made). A prompt
    that leaves no room for a response within ``max_length`` is an error (``overlong="error"``) or
    dropped (``"drop"``); responses longer than the room left are truncated. Returns (encoded
    examples, number dropped, number of responses truncated)."""
    if tokenized is None:
        tokenized = tokenize_examples(examples, tokenizer, prompt_format)
    encoded, dropped, truncated = [], 0, 0
    for ex, (prompt_ids, responses) in zip(examples, tokenized):
        pairs = [_cut(prompt_ids, r, max_length) for r in responses]
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

def _shares(pair: EncodedPair, parent: EncodedPair, length: int) -> int:
    """How many of ``pair``'s first tokens it may read from ``parent``: ``length`` if they are the
    same tokens (they are when both were encoded from the same prompt text), else 0."""
    length = min(length, len(pair.input_ids), len(parent.input_ids))
    return length if length > 0 and pair.input_ids[:length] == parent.input_ids[:length] else 0


def pack_batch(batch: list, pad_id: int, extra_rows: dict | None = None, layout: str = "packed",
               owners: dict | None = None, positive_responses: bool = True) -> dict:
    """One batch holding every sequence of the micro-batch: B positives first, then all negatives,
    then any ``extra_rows`` groups (name -> list of EncodedPair: normal data, random answers,
    generated anchors, recovery rows), so that a single forward pass serves the whole loss.
    ``owners`` (name -> the example index of each row, or None) says which example's prompt a
    group's rows start with; recovery rows start with their example's first harmful response cut
    at their ``prompt_length``. In the packed layout those starts are encoded once.
    ``positive_responses=False`` (a method that never reads them, e.g. GA) keeps only each positive's
    prompt, which its negatives still share.

    Keys: ``layout`` (wpn_dist.core.packing.Layout: the model input and where each sequence lies);
    negative_rows [B,K] (row of each negative) and negative_mask [B,K]; example_ids [B]; and
    ``<name>_rows`` [n] for each extra group."""
    from ..core.packing import Layout, Sequence
    extra_rows, owners = extra_rows or {}, owners or {}
    batch_size = len(batch)
    sequences = [Sequence(e.positive.input_ids if positive_responses else e.positive.input_ids[:e.positive.prompt_length],
                          e.positive.prompt_length) for e in batch]
    first_negative = []
    for i, e in enumerate(batch):
        first_negative.append(len(sequences))
        for n in e.negatives:
            sequences.append(Sequence(n.input_ids, n.prompt_length, i, _shares(n, e.positive, n.prompt_length)))
    packed = {}
    for name, group in extra_rows.items():
        start = len(sequences)
        for pair, owner in zip(group, owners.get(name) or [None] * len(group)):
            if owner is None:
                sequences.append(Sequence(pair.input_ids, pair.prompt_length))
            elif name == "recovery":
                parent = first_negative[owner]
                shared = _shares(pair, batch[owner].negatives[0], pair.prompt_length)
                sequences.append(Sequence(pair.input_ids, pair.prompt_length, parent, shared))
            else:
                shared = _shares(pair, batch[owner].positive, batch[owner].positive.prompt_length)
                sequences.append(Sequence(pair.input_ids, pair.prompt_length, owner, shared))
        packed[f"{name}_rows"] = torch.arange(start, len(sequences), dtype=torch.long)
    for s in sequences:
        if s.shared == 0:
            s.parent = -1
    max_neg = max(len(e.negatives) for e in batch)
    negative_rows = torch.zeros((batch_size, max_neg), dtype=torch.long)
    negative_mask = torch.zeros((batch_size, max_neg), dtype=torch.bool)
    for i, e in enumerate(batch):
        for k in range(len(e.negatives)):
            negative_rows[i, k], negative_mask[i, k] = first_negative[i] + k, True
    packed.update({"layout": Layout(sequences, layout, pad_id), "negative_rows": negative_rows,
                   "negative_mask": negative_mask,
                   "example_ids": torch.tensor([e.example_id for e in batch], dtype=torch.long)})
    return packed


def batch_to_device(batch: dict, device) -> dict:
    """The batch's model input and float tensors on ``device``. Row indices and masks stay on the
    host: the methods build their index tensors there, without device synchronisation."""
    batch["layout"] = batch["layout"].to(device)
    return {k: v.to(device) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


PROMPT_FORMAT = "### Question: {prompt} ### Answer:"  # the default of every command line
TOY_MAX_LENGTH = 256  # --max_length of evaluate, and of the toy world's data on another model
# The toy model's positions, and so the toy world's --max_length on it: a row past it (a long disturbed
# prompt, --prompt_noise_wrap) is cut to fit instead of indexing past the position table.
TOY_CONTEXT = 64


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
    """Builds each optimizer step's packed batches for the method: the examples' positives and
    negatives, plus the extra row groups the method asks for (``Method.row_groups``):
    - ``normal``: as many random normal-data rows as examples (retain and KL terms);
    - ``random``: each harmful prompt paired with a random normal response (GA's L_rand);
    - ``anchor``: each prompt with the model's own continuation (WPN's --anchor generation; set by
      ``set_anchors``);
    - ``recovery``: ``recovery_cuts`` rows per example, ``[prompt; first k tokens of its first harmful
      response; its harmless response]`` at cuts k, evenly spaced or drawn at random every step (WPN's
      --recovery_cuts and --recovery_depths): the state after a harmful start, and the harmless way out of it.
    With ``prompt_noise`` (WPN's and sft's --prompt_noise) an example's prompt is disturbed for the step
    in all its rows, with tokens of ``prompt_noise_pool`` (wpn_dist.app.prompt_noise); the normal rows stay
    as they are.
    Random draws are seeded by (seed, step, example), so a resumed run draws the same rows, every rank
    can tell what every other rank draws, and the draws do not depend on how the step is split
    across ranks and micro-batches.

    Each batch also carries what makes its loss exact over the whole step (see ``step_batches``):
    ``row_weights`` [S] (0 for a sampler's padding copy of an example already counted in the step),
    ``normalizers`` (the step's global counts divided by ranks x accumulation steps) and
    ``num_tokens`` (this batch's counted tokens, for throughput)."""

    def __init__(self, encoded: list, examples: list, tokenizer, prompt_format: str, max_length: int,
                 groups: tuple, normal_rows: list | None, seed: int, recovery_cuts: int = 0,
                 recovery_depths: str = "even", layout: str = "packed", positive_responses: bool = True,
                 prompt_noise: float = 0.0, prompt_noise_pool: str = "data", prompt_noise_wrap: float = 0.0):
        self.encoded, self.tokenizer, self.groups, self.seed = encoded, tokenizer, groups, seed
        self.layout, self.positive_responses = layout, positive_responses
        self.recovery_cuts = recovery_cuts if "recovery" in groups else 0
        if recovery_depths not in ("even", "random"):
            raise ValueError(f"recovery depths must be 'even' or 'random', got {recovery_depths!r}")
        self.recovery_depths = recovery_depths
        self.prompt_format, self.max_length = prompt_format, max_length
        self.examples = {e.example_id: e for e in examples}
        self.normal_rows = normal_rows or []
        self.normal_pairs = encode_normal(self.normal_rows, tokenizer, prompt_format, max_length)
        self.noise = None
        if prompt_noise > 0:
            from .prompt_noise import POOLS, PromptNoise
            if prompt_noise_pool not in POOLS:
                raise ValueError(f"prompt noise pool must be one of {POOLS}, got {prompt_noise_pool!r}")
            prompts = [e.positive.input_ids[:e.positive.prompt_length] for e in encoded]
            prompts += [p.input_ids[:p.prompt_length] for p in self.normal_pairs]
            responses = []
            if prompt_noise_pool == "data":
                responses = [x.input_ids[x.prompt_length:] for e in encoded for x in [e.positive] + e.negatives]
                responses += [p.input_ids[p.prompt_length:] for p in self.normal_pairs]
            self.noise = PromptNoise(prompt_noise, tokenizer, prompt_format, prompts, seed, responses,
                                     wrap=prompt_noise_wrap)
        if ("normal" in groups or "random" in groups) and not self.normal_pairs:
            raise DataError("this method needs normal data (--normal_data), and none was given")
        self.anchors: dict = {}
        self._random_pairs: dict = {}  # (example id, normal row) -> EncodedPair: every rank encodes them

    def set_anchors(self, continuations: dict) -> None:
        """example id -> the model's continuation of its prompt (text)."""
        self.anchors = {i: encode_pair(self.tokenizer, self.prompt_text(i), text, self.max_length)
                        for i, text in continuations.items()}

    def prompt_text(self, example_id: int) -> str:
        return self.prompt_format.format(prompt=self.examples[example_id].prompt)

    def _random_pair(self, example_id: int, normal_index: int) -> EncodedPair:
        key = (example_id, normal_index)
        if key not in self._random_pairs:
            self._random_pairs[key] = encode_pair(self.tokenizer, self.prompt_text(example_id),
                                                  self.normal_rows[normal_index]["response"], self.max_length)
        return self._random_pairs[key]

    def _extra_rows(self, batch: list, step: int) -> dict:
        """Each example's rows of every extra group; a group's draw for an example is its own."""
        extra = {}
        for group in self.groups:
            rows = []
            for e in batch:
                rng = random.Random(f"{self.seed}-{step}-{e.example_id}-{group}")
                if group == "recovery":
                    rows.extend(self._recovery_rows(e, rng))
                elif group == "normal":
                    rows.append(self.normal_pairs[rng.randrange(len(self.normal_pairs))])
                elif group == "random":
                    rows.append(self._random_pair(e.example_id, rng.randrange(len(self.normal_rows))))
                elif group == "anchor":
                    rows.append(self.anchors[e.example_id])
            extra[group] = rows
        return extra

    def _rows_with_weights(self, indices: list, first_copy: list, step: int) -> tuple:
        """The micro-batch's examples, extra rows and per-row weights in packed-row order: every row
        belongs to an example and weighs 1 if that is the example's first copy in the step, else 0."""
        batch = [self.encoded[i] for i in indices]
        batch = [self.disturbed(e, step) for e in batch]
        extra = self._extra_rows(batch, step)
        weights = [float(f) for f in first_copy]
        weights += [float(f) for e, f in zip(batch, first_copy) for _ in e.negatives]
        for group, rows in extra.items():
            per_example = self.recovery_cuts if group == "recovery" else 1
            weights += [float(f) for f in first_copy for _ in range(per_example)]
        return batch, extra, weights

    def disturbed(self, example: EncodedExample, step: int) -> EncodedExample:
        """The example with its prompt disturbed for this step (--prompt_noise; wpn_dist.app.prompt_noise),
        in every row; as it is when the disturbed prompt leaves no room for a response."""
        if self.noise is None:
            return example
        original = example.positive.input_ids[:example.positive.prompt_length]
        prompt = self.noise.apply(original, example.example_id, step)
        if prompt is original or len(prompt) >= self.max_length:
            return example

        def disturbed(pair: EncodedPair) -> EncodedPair:
            response = pair.input_ids[pair.prompt_length:]
            room = self.max_length - len(prompt)
            return EncodedPair(prompt + response[:room], len(prompt), pair.truncated or len(response) > room)
        return EncodedExample(example.example_id, disturbed(example.positive), [disturbed(n) for n in example.negatives])

    def _recovery_rows(self, example: EncodedExample, rng: random.Random) -> list:
        """The example's first harmful response cut after k of its tokens, each continued with the
        harmless response. ``prompt_length`` of a row is where the cut is. The cuts k are evenly spaced
        in the response, or (``recovery_depths="random"``) drawn afresh at every step, distinct and
        uniform over 1 .. len - 1, so that over the run every depth of a harmful start is trained."""
        harmful, harmless = example.negatives[0], example.positive
        answer = harmful.input_ids[harmful.prompt_length:-1] or harmful.input_ids[harmful.prompt_length:]
        refusal = harmless.input_ids[harmless.prompt_length:]
        n = len(answer)
        if self.recovery_depths == "random" and n > 1:
            depths = range(1, n)
            cuts = rng.sample(depths, self.recovery_cuts) if self.recovery_cuts <= len(depths) else \
                [rng.choice(depths) for _ in range(self.recovery_cuts)]
        else:
            cuts = [max(1, round((c + 1) * n / (self.recovery_cuts + 1))) for c in range(self.recovery_cuts)]
        rows = []
        for k in sorted(cuts):
            cut = harmful.prompt_length + k
            rows.append(EncodedPair((harmful.input_ids[:cut] + refusal)[:self.max_length], cut))
        return rows

    def make(self, indices: list, step: int, micro: int, rank: int) -> dict:
        """One packed batch of ``indices`` (into the encoded examples), every row weighted 1 and the
        terms' normalizers left to their defaults: each term is the plain mean over this batch."""
        batch, extra, _ = self._rows_with_weights(indices, [True] * len(indices), step)
        return self._pack(batch, extra)

    def _pack(self, batch: list, extra: dict) -> dict:
        per_example = {"recovery": self.recovery_cuts, "anchor": 1, "random": 1}
        owners = {name: [i for i in range(len(batch)) for _ in range(per_example[name])]
                  for name in extra if name in per_example}
        packed = pack_batch(batch, self.tokenizer.pad_token_id, extra, self.layout, owners, self.positive_responses)
        if "recovery" in extra:  # whose harmful response each recovery row cuts
            packed["recovery_example"] = torch.arange(len(batch)).repeat_interleave(self.recovery_cuts)
        return packed

    def step_batches(self, plan: list, step: int, rank: int) -> list:
        """This rank's packed batches, one per micro-batch, of a step whose ``plan[micro][rank]`` lists
        every rank's example indices.

        An example counts once in the step (its first copy in micro-batch, rank, position order): later
        copies, which the sampler adds to fill the last step of an epoch, get row weight 0. Every term
        is a weighted sum divided by the step's global count / (ranks x micro-batches); the engine
        averages gradients over ranks and micro-batches, so each term's gradient is that of its mean
        over the whole global batch: the same for any world size and accumulation."""
        num_micro, world = len(plan), len(plan[0])
        seen, counts, mine, gather_shapes = set(), {}, [], []
        for micro in range(num_micro):
            seen_in_micro, shapes = set(), []
            for r in range(world):
                indices = plan[micro][r]
                first_copy, first_in_micro = [], []
                for i in indices:
                    example_id = self.encoded[i].example_id
                    first_copy.append(example_id not in seen)
                    first_in_micro.append(example_id not in seen_in_micro)
                    seen.add(example_id)
                    seen_in_micro.add(example_id)
                shapes.append((len(indices), max((len(self.encoded[i].negatives) for i in indices), default=0)))
                batch, extra, weights = self._rows_with_weights(indices, first_copy, step)
                _add_counts(counts, batch, extra, weights)
                if r == rank:
                    mine.append((batch, extra, weights, first_in_micro))
            # What the N-pair loss's gather needs, known here for every rank: no collective to find it.
            gather_shapes.append((max(b for b, _ in shapes), max(k for _, k in shapes)))
        scale = num_micro * world
        normalizers = {key: max(value, 1.0) / scale for key, value in counts.items()}
        out = []
        for (batch, extra, weights, first_in_micro), gather_shape in zip(mine, gather_shapes):
            packed = self._pack(batch, extra)
            packed["row_weights"] = torch.tensor(weights, dtype=torch.float32)
            packed["normalizers"] = normalizers
            # Negatives that count in the micro-step's global pool: an example's first copy in it.
            first = torch.tensor(first_in_micro, dtype=torch.bool)
            packed["negative_first"] = packed["negative_mask"] & first[:, None]
            packed["gather_shape"] = gather_shape
            if self.recovery_cuts:
                packed["recovery_first"] = first.repeat_interleave(self.recovery_cuts)[:, None]
                packed["recovery_gather_shape"] = (gather_shape[0] * self.recovery_cuts, 1)
            # tokens the forward computes for counted rows (a shared start counts where it is computed)
            packed["num_tokens"] = int(sum(w * n for w, n in zip(weights, packed["layout"].own_tokens().tolist())))
            out.append(packed)
        return out


def _add_counts(counts: dict, batch: list, extra: dict, weights: list) -> None:
    """Add a micro-batch's weighted counts: anchors, labelled (response) tokens and attended
    positions per row group, and labelled tokens of every row for the plain LM term."""
    def add(key, value):
        counts[key] = counts.get(key, 0.0) + value

    groups = [("positive", [e.positive for e in batch]), ("negative", [n for e in batch for n in e.negatives])]
    groups += list(extra.items())
    at = 0
    for name, pairs in groups:
        for pair in pairs:
            w = weights[at]
            at += 1
            add(f"tokens/{name}", w * (len(pair.input_ids) - pair.prompt_length))
            add(f"attended/{name}", w * len(pair.input_ids))
            add(f"rows/{name}", w)
            add("tokens/all", w * (len(pair.input_ids) - 1))
    add("anchors", sum(weights[:len(batch)]))


class ShardedSampler:
    """Deterministic per-epoch shuffle, padded by repetition to a whole number of optimizer steps
    (``micro_batch_size x world_size x accumulation`` examples each) and split across ranks, so that
    an epoch always ends on a step boundary. The padding copies keep their example ids; the step's
    batches count each example once (BatchMaker.step_batches).

    ``micro_batches(epoch)`` gives this rank's micro-batches (lists of example indices) for an epoch;
    a resumed run skips the ones already consumed."""

    def __init__(self, num_examples: int, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 accumulation: int = 1):
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size, self.seed, self.accumulation = rank, world_size, seed, accumulation

    def micro_batches_per_epoch(self) -> int:
        per_step = self.micro_batch_size * self.world_size * self.accumulation
        return -(-self.num_examples // per_step) * self.accumulation

    def micro_batches(self, epoch: int) -> list:
        order = list(range(self.num_examples))
        random.Random(self.seed * 100003 + epoch).shuffle(order)
        total = self.micro_batches_per_epoch() * self.micro_batch_size * self.world_size
        while len(order) < total:  # pad by repetition
            order += order[: total - len(order)]
        mine = order[self.rank::self.world_size]
        return [mine[i:i + self.micro_batch_size] for i in range(0, len(mine), self.micro_batch_size)]


class DataCursor:
    """Where the loop is in the data: the epoch, the optimizer steps taken in it, and the subset of
    examples it covers (ICU's refinement narrows it). With the sampler's deterministic order that is
    all a resumed run needs to see the same batches. Every rank holds the whole step's plan (every
    rank's micro-batches), so that the loss can count each example once over the step."""

    def __init__(self, subset, micro_batch_size: int, world_size: int, accumulation: int, seed: int,
                 epoch: int = 0, index: int = 0):
        self.micro_batch_size, self.world_size = micro_batch_size, world_size
        self.accumulation, self.seed = accumulation, seed
        self.epoch, self.index = epoch, index
        self._start(subset)

    def _start(self, subset) -> None:
        self.subset = list(subset)
        if not self.subset:
            self._steps = []
            return
        per_rank = [ShardedSampler(len(self.subset), self.micro_batch_size, r, self.world_size, self.seed,
                                   self.accumulation).micro_batches(self.epoch) for r in range(self.world_size)]
        num_steps = len(per_rank[0]) // self.accumulation
        self._steps = [[[[self.subset[i] for i in per_rank[r][s * self.accumulation + m]]
                         for r in range(self.world_size)] for m in range(self.accumulation)]
                       for s in range(num_steps)]

    def epoch_done(self) -> bool:
        return self.index == len(self._steps)

    def start_epoch(self, subset=None) -> None:
        self.epoch, self.index = self.epoch + 1, 0
        self._start(self.subset if subset is None else subset)

    def restrict(self, subset) -> None:
        """Cover only ``subset`` in the epoch now starting (before its first step)."""
        assert self.index == 0, "an epoch's subset changes only before its first step"
        self._start(subset)

    def next_step(self) -> list:
        """The next step's plan: ``plan[micro][rank]`` = example indices. Call only when not epoch_done()."""
        assert not self.epoch_done(), "the epoch is over: start the next one first"
        self.index += 1
        return self._steps[self.index - 1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "subset": self.subset}
