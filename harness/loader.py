"""BOS-aligned best-fit packing of the token cache into (inputs, targets) batches.

Every row of seq_len + 1 tokens starts at a document start (documents begin with BOS) and has no padding:
it is filled with the largest buffered document that still fits; only when none fits is the shortest one
cropped to fill the rest of the row (its remainder is dropped).
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

import numpy as np
import torch

from harness.prepared import Prepared

BUFFER_DOCS = 1000  # documents the packer chooses from


def load_split(data: Prepared, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, starts): the split's uint16 token memmap and its document starts (with the end appended)."""
    tokens = np.memmap(data.tokens / f"{split}.bin", dtype=np.uint16, mode="r")
    return tokens, np.load(data.tokens / f"{split}.idx.npy")


def _documents(starts: np.ndarray, seed: int | None, loop: bool) -> Iterator[tuple[int, int]]:
    """(start, length) of each document: in order (seed None) or shuffled anew each epoch; forever if loop."""
    n = len(starts) - 1
    rng = np.random.default_rng(seed)
    while n > 0:
        order = range(n) if seed is None else rng.permutation(n)
        for i in order:
            yield int(starts[i]), int(starts[i + 1] - starts[i])
        if not loop:
            return


def pack_rows(starts: np.ndarray, row_len: int, *, seed: int | None = None, loop: bool = False,
              buffer_docs: int = BUFFER_DOCS) -> Iterator[list[tuple[int, int]]]:
    """Rows as lists of (start, length) token ranges, best fit; ends (dropping a partial row) when documents run out."""
    documents = _documents(starts, seed, loop)
    lengths: list[int] = []  # the buffer, sorted by length
    offsets: list[int] = []
    while True:
        row, room = [], row_len
        while room > 0:
            for start, length in itertools.islice(documents, buffer_docs - len(lengths)):
                k = bisect.bisect_right(lengths, length)
                lengths.insert(k, length)
                offsets.insert(k, start)
            if not lengths:
                return
            k = bisect.bisect_right(lengths, room) - 1  # the largest document that fits
            take = lengths[k] if k >= 0 else room       # none fits: crop the shortest
            row.append((offsets.pop(max(k, 0)), take))
            lengths.pop(max(k, 0))
            room -= take
        yield row


def token_rows(data: Prepared, split: str, seq_len: int, *, seed: int | None = None,
               loop: bool = False) -> Iterator[np.ndarray]:
    """Rows of seq_len + 1 token ids (uint16), packed as pack_rows does: inputs and, shifted by one, targets."""
    tokens, starts = load_split(data, split)
    for row in pack_rows(starts, seq_len + 1, seed=seed, loop=loop):
        yield np.concatenate([tokens[start:start + length] for start, length in row])


def batches(data: Prepared, split: str, batch_size: int, seq_len: int, device: torch.device | str, *,
            seed: int | None = None, loop: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) int64 (batch_size, seq_len) on device, targets shifted by one; the last batch may be short."""
    rows = token_rows(data, split, seq_len, seed=seed, loop=loop)
    device = torch.device(device)
    cuda = device.type == "cuda"
    while True:
        batch = list(itertools.islice(rows, batch_size))
        if not batch:
            return
        pair = torch.from_numpy(np.stack(batch).astype(np.int64))
        if cuda:
            pair = pair.pin_memory()
        pair = pair.to(device, non_blocking=cuda)
        yield pair[:, :-1], pair[:, 1:]
        if len(batch) < batch_size:
            return
