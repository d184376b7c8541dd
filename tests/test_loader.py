import itertools

import numpy as np
import torch

from harness.loader import batches, load_split, pack_rows


def starts_of(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)])


def test_best_fit():
    # row 1: 6 is the largest that fits 10, then 4 fills it; row 2: 3 + 2 leave 5 free with nothing left -> dropped
    rows = list(pack_rows(starts_of([6, 4, 3, 2]), 10))
    assert rows == [[(0, 6), (6, 4)]]


def test_crop_only_when_nothing_fits():
    lengths = [12, 30, 7, 9]
    rows = list(pack_rows(starts_of(lengths), 10))
    # 9 fits first; then nothing fits 1 slot: the shortest (7) is cropped. Next: nothing fits 10 -> crop 12.
    assert rows == [[(49, 9), (42, 1)], [(0, 10)], [(12, 10)]]


def test_rows_are_full_and_aligned():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=500).tolist()
    starts = starts_of(lengths)
    doc_start = set(starts[:-1].tolist())
    length_of = dict(zip(starts[:-1].tolist(), lengths))
    for row in itertools.islice(pack_rows(starts, 65, seed=1, loop=True), 2000):
        assert sum(n for _, n in row) == 65
        assert all(s in doc_start for s, _ in row)            # every piece starts at a document start
        assert all(n == length_of[s] for s, n in row[:-1])    # only the last piece may be cropped


def test_seeded_and_looping():
    starts = starts_of([5, 8, 13, 21, 34, 55] * 3)
    a = list(itertools.islice(pack_rows(starts, 16, seed=0, loop=True), 100))  # far more than one epoch
    assert a == list(itertools.islice(pack_rows(starts, 16, seed=0, loop=True), 100))
    assert a != list(itertools.islice(pack_rows(starts, 16, seed=1, loop=True), 100))
    assert len(list(pack_rows(starts, 16))) < 100  # without loop it ends


def test_batches(prepared_test):
    tokens, starts = load_split(prepared_test, "train")
    it = batches(prepared_test, "train", 8, 64, "cpu", seed=3, loop=True)
    for x, y in itertools.islice(it, 20):
        assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == 2047).all()                 # every row starts with BOS
        assert torch.equal(x[:, 1:], y[:, :-1])        # targets are the inputs shifted
        assert ((x >= 0) & (x < 2048)).all()
    x2, _ = next(batches(prepared_test, "train", 8, 64, "cpu", seed=3, loop=True))
    x3, _ = next(batches(prepared_test, "train", 8, 64, "cpu", seed=4, loop=True))
    x1, _ = next(batches(prepared_test, "train", 8, 64, "cpu", seed=3, loop=True))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_rows_are_documents(prepared_test):
    """No padding: each BOS-delimited piece of a row is the start of a real document of the cache."""
    tokens, starts = load_split(prepared_test, "val")
    docs = {tuple(tokens[s:e][:8].tolist()) for s, e in zip(starts[:-1], starts[1:])}
    x, y = next(batches(prepared_test, "val", 16, 64, "cpu"))
    for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
        bos = [i for i, t in enumerate(row) if t == 2047]
        assert bos[0] == 0
        for a, b in zip(bos, bos[1:] + [len(row)]):
            piece = tuple(row[a:b][:8])
            assert any(d[:len(piece)] == piece for d in docs)


def test_val_is_fixed_and_finite(prepared_test):
    a = [x for x, _ in batches(prepared_test, "val", 32, 256, "cpu")]
    b = [x for x, _ in batches(prepared_test, "val", 32, 256, "cpu", seed=None)]
    assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))
    assert sum(len(x) for x in a) * 256 >= 32768  # the cpu profile's eval_tokens fit
