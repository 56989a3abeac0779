"""Where every sequence of a batch lies in the model's input, in one of two layouts.

A batch holds S logical sequences: each example's positive, its negatives, then the method's extra
row groups. Each is a list of token ids whose first ``prompt_length`` tokens are its prompt. A
sequence may declare that it starts with the first ``shared`` tokens of an earlier one (its
``parent``): an example's negatives start with the positive's prompt, a recovery row with the
prompt and the first k tokens of a harmful response.

- ``packed`` (the default): one row holding each distinct token once, no padding. A sequence reads
  its shared start from its parent's tokens instead of encoding it again; attention follows the
  logical sequences (``packed_attention``) and every token keeps its logical position, so the model
  computes exactly what it computes in the padded layout.
- ``padded``: one row per sequence, right-padded to the longest, every shared start encoded again
  (the old layout, kept for comparison and for models ``packed_attention`` does not support).

The methods never look at the layout itself: they ask for the flat positions (into the model
output's ``[rows x length]`` token axis) of a span of some sequences, or of the next-token targets
of their tokens, and pool or score those. Index tensors are built on the host from the batch's
description: asking costs no device synchronisation.
"""
from dataclasses import dataclass

import torch

LAYOUTS = ("packed", "padded")


@dataclass
class Sequence:
    token_ids: list
    prompt_length: int
    parent: int = -1   # an earlier sequence whose first ``shared`` tokens this one starts with (-1: none)
    shared: int = 0

    @property
    def own_start(self) -> int:
        """Where the tokens this sequence adds begin: after its shared start, if it has a parent."""
        return self.shared if self.parent >= 0 else 0


@dataclass
class Tokens:
    """Some tokens of some sequences: ``flat`` [n] positions in the model output's token axis (on the
    layout's device; ``flat_host`` the same on the host), ``row`` [n] the index (into the rows asked for) of the sequence each belongs to
    (host), ``rank`` [n] its 0-based place in its span (host), ``lengths`` [rows] each span's length
    (host), ``labels`` [n] for targets: the token each position predicts (on the device)."""
    flat: torch.Tensor
    flat_host: torch.Tensor
    row: torch.Tensor
    rank: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor | None = None


def _rows(x) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach().to("cpu", torch.long).reshape(-1)
    return torch.tensor(list(x), dtype=torch.long)


def _as_host(x, rows: int) -> torch.Tensor:
    if torch.is_tensor(x):
        x = x.detach().to("cpu", torch.long)
        return x.expand(rows) if x.dim() == 0 else x
    return torch.full((rows,), int(x), dtype=torch.long)


class Layout:
    def __init__(self, sequences: list, kind: str = "packed", pad_id: int = 0, device="cpu"):
        if kind not in LAYOUTS:
            raise ValueError(f"unknown batch layout {kind!r}; choose one of {LAYOUTS}")
        self.sequences, self.kind, self.pad_id = sequences, kind, pad_id
        self.device = torch.device(device)
        self.lengths = torch.tensor([len(s.token_ids) for s in sequences], dtype=torch.long)
        self.prompt_lengths = torch.tensor([s.prompt_length for s in sequences], dtype=torch.long)
        self.offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), self.lengths]), 0)
        self.segments = []  # packed: (start, count, prefix flat positions) of each sequence's own tokens
        if kind == "padded":
            width = int(self.lengths.max())
            ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
            for row, s in enumerate(sequences):
                ids[row, :len(s.token_ids)] = torch.tensor(s.token_ids)
            self.input_ids = ids
            self.attention_mask = (torch.arange(width)[None, :] < self.lengths[:, None]).long()
            # flat position of token t of sequence s: s * width + t
            self.flat = torch.cat([row * width + torch.arange(n) for row, n in enumerate(self.lengths.tolist())])
        else:
            ids, positions, flat_of = [], [], []
            for index, s in enumerate(sequences):
                prefix = []
                if s.parent >= 0:
                    assert s.parent < index, "a sequence's parent comes before it"
                    parent = sequences[s.parent]
                    assert 0 < s.shared <= len(parent.token_ids) and \
                        parent.token_ids[:s.shared] == s.token_ids[:s.shared], "a shared start must be the same tokens"
                    prefix = flat_of[s.parent][:s.shared]
                start, own = len(ids), s.token_ids[s.own_start:]
                ids += own
                positions += range(len(prefix), len(s.token_ids))
                flat_of.append(prefix + list(range(start, start + len(own))))
                self.segments.append((start, len(own), prefix))
            self.input_ids = torch.tensor([ids], dtype=torch.long)
            self.position_ids = torch.tensor([positions], dtype=torch.long)
            self.flat = torch.tensor([f for seq in flat_of for f in seq], dtype=torch.long)
        self.token_ids = self.input_ids.flatten()  # by flat position
        self._device_cache: dict = {}

    # --- what the model runs on -----------------------------------------------------------------

    def to(self, device) -> "Layout":
        self.device = torch.device(device)
        self._device_cache = {}
        return self

    def num_executed_tokens(self) -> int:
        """Tokens the forward runs over: the whole padded rectangle, or each distinct token once."""
        return int(self.input_ids.numel())

    def distinct_tokens(self) -> int:
        """The batch's distinct tokens (each shared start once), whatever the layout: its useful tokens."""
        return sum(len(s.token_ids) - s.own_start for s in self.sequences)

    def own_tokens(self) -> torch.Tensor:
        """[S] tokens the forward computes for each sequence: its length, less its shared start when packed."""
        if self.kind == "padded":
            return self.lengths.clone()
        return self.lengths - torch.tensor([s.own_start for s in self.sequences])

    def model_inputs(self) -> dict:
        """Keyword inputs of the model's forward. Packed: positions are the logical ones; the 4-D
        placeholder mask makes transformers skip building an N x N mask that packed attention ignores."""
        if self.kind == "padded":
            return {"input_ids": self._on_device("input_ids", self.input_ids),
                    "attention_mask": self._on_device("attention_mask", self.attention_mask)}
        return {"input_ids": self._on_device("input_ids", self.input_ids),
                "position_ids": self._on_device("position_ids", self.position_ids),
                "attention_mask": self._on_device("placeholder_mask", torch.zeros(1, 1, 1, 1))}

    def _on_device(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key not in self._device_cache:
            self._device_cache[key] = tensor.to(self.device)
        return self._device_cache[key]

    # --- what the methods ask -------------------------------------------------------------------

    def _tokens_of(self, rows: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> tuple:
        """For tokens ``start <= t < stop`` of each of ``rows``: their index into ``self.flat``, the
        row (into ``rows``) each belongs to, its rank in its span, and the spans' lengths."""
        lengths = (stop - start).clamp_min(0)
        row = torch.repeat_interleave(torch.arange(rows.shape[0]), lengths)
        rank = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        return self.offsets[rows][row] + start[row] + rank, row, rank, lengths

    def span(self, rows, start=None, stop=None) -> Tokens:
        """Tokens ``start <= t < stop`` of each of ``rows`` (defaults: the response, from the prompt's
        end to the sequence's end). ``start``/``stop``: an int or one value per row."""
        rows = _rows(rows)
        start = self.prompt_lengths[rows] if start is None else _as_host(start, rows.shape[0])
        stop = self.lengths[rows] if stop is None else _as_host(stop, rows.shape[0])
        at, row, rank, lengths = self._tokens_of(rows, start, stop)
        flat = self.flat[at]
        return Tokens(flat.to(self.device), flat, row, rank, lengths)

    def prompt(self, rows) -> Tokens:
        return self.span(rows, start=0, stop=self.prompt_lengths[_rows(rows)])

    def every_token(self, rows) -> Tokens:
        return self.span(rows, start=0, stop=self.lengths[_rows(rows)])

    def targets(self, rows, start=None) -> Tokens:
        """Next-token targets: for each token t >= max(start, 1) of each of ``rows`` (default start:
        the prompt's end, i.e. the response tokens), the position whose output predicts it
        (``flat``, the token before it) and the token itself (``labels``)."""
        rows = _rows(rows)
        start = self.prompt_lengths[rows] if start is None else _as_host(start, rows.shape[0])
        at, row, rank, lengths = self._tokens_of(rows, start.clamp_min(1), self.lengths[rows])
        predictors = self.flat[at - 1]
        return Tokens(predictors.to(self.device), predictors, row, rank, lengths,
                      labels=self.token_ids[self.flat[at]].to(self.device))

    def select(self, rows) -> "Layout":
        """A layout of only ``rows``, in that order (shared starts kept where the parent is selected
        too): what a frozen reference model runs over."""
        rows = _rows(rows).tolist()
        new_index = {old: new for new, old in enumerate(rows)}
        chosen = []
        for old in rows:
            s = self.sequences[old]
            if s.parent in new_index and new_index[s.parent] < new_index[old]:
                chosen.append(Sequence(s.token_ids, s.prompt_length, new_index[s.parent], s.shared))
            else:
                chosen.append(Sequence(s.token_ids, s.prompt_length))
        return Layout(chosen, self.kind, self.pad_id, self.device)

    # --- what packed attention reads ------------------------------------------------------------

    def attention_plan(self, window: int | None = None) -> list:
        """Packed: for each sequence adding tokens, ``(start, count, keys, mask)``: its own tokens
        ``[start, start + count)`` of the packed row attend to ``keys`` (its shared start's flat
        positions, then its own), under ``mask`` [count, keys] (causal in logical positions, and
        within ``window`` for a local-attention layer); ``keys`` and ``mask`` are None when plain
        causal attention over its own tokens is exact."""
        key = f"plan/{window}"
        if key not in self._device_cache:
            plan = []
            for start, count, prefix in self.segments:
                if count == 0:
                    continue
                total = len(prefix) + count
                if not prefix and (window is None or total <= window):
                    plan.append((start, count, None, None))
                    continue
                keys = torch.tensor(prefix + list(range(start, start + count)), dtype=torch.long)
                query_pos = torch.arange(len(prefix), total)[:, None]
                key_pos = torch.arange(total)[None, :]
                mask = key_pos <= query_pos
                if window is not None:
                    mask &= key_pos > query_pos - window
                plan.append((start, count, keys.to(self.device), mask.to(self.device)))
            self._device_cache[key] = plan
        return self._device_cache[key]


def pool_tokens(hidden: torch.Tensor, tokens: Tokens, mode: str = "weighted") -> torch.Tensor:
    """Pool ``hidden`` [rows x length, D] (the flattened output) over each span of ``tokens`` into
    [spans, D] in fp32: the segment-sum form of ``pooling.pool`` (``weighted``: the t-th of n tokens
    weighs t / (n(n+1)/2); ``mean``: 1/n; ``last``: the last token). An empty span pools to zeros."""
    n = tokens.lengths.to(torch.float32)[tokens.row]
    rank = tokens.rank.to(torch.float32)
    if mode == "weighted":
        weights = (rank + 1) / (n * (n + 1) / 2)
    elif mode == "mean":
        weights = 1.0 / n
    elif mode == "last":
        weights = (rank == n - 1).to(torch.float32)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    values = hidden[tokens.flat].to(torch.float32) * weights.to(hidden.device)[:, None]
    out = torch.zeros(tokens.lengths.shape[0], hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    return out.index_add(0, tokens.row.to(hidden.device), values)
