"""Shared fixtures: the `test` profile's data prepared once per session, and a tiny train.py for runner tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness.sandbox import share_cores

# pytest-xdist runs the tests in several processes at once: each, and every trial it starts, takes its share of the
# cores, as `hybrid run --workers` shares them among its workers. Two cpu-profile trials at once on 2 cores trained
# 5 to 7 steps with 2 threads each, 31 to 32 with 1 (benchmarks/results/overhead_cpu_two_before_r1.md,
# overhead_cpu_two_one_thread.md).
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if XDIST_WORKERS > 1:
    CORE_SHARE = share_cores(XDIST_WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(CORE_SHARE))  # the hybrid processes tests start
    torch.set_num_threads(CORE_SHARE)  # this process's own torch work

# A 1-layer model on harness.api. MODE picks a behaviour for the failure-class and causality tests. The training
# runs in main() (the evaluation process runs train.py as a module to find the model's class, not its main()).
TINY_TRAIN_PY = '''
import os, time
import torch
import torch.nn.functional as F
from harness import api

MODE = "ok"  # ok | raise | nan | sleep | no-finish | bad-shape | oom | exit | reads-ahead | mixes-rows | stateful
DEVICE_BATCH_SIZE = 8
TOTAL_BATCH_SIZE = 512
LR = 0.01
DIM = 32


class Tiny(torch.nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
        self.head = torch.nn.Linear(dim, vocab)
        self.calls = 0

    def forward(self, idx):
        if MODE == "reads-ahead":  # sees the token it is asked to predict
            idx = torch.roll(idx, -1, dims=1)
        h = self.emb(idx)
        if MODE == "mixes-rows":  # every row sees the others of its batch
            h = h + h.mean(0, keepdim=True)
        logits = self.head(h + self.mlp(h))
        if MODE == "stateful" and not self.training:  # answers differently in each call
            self.calls += 1
            logits = logits * (1 + 0.5 * self.calls)
        return logits[:, :, :-1] if MODE == "bad-shape" and not self.training else logits


def main():
    session = api.start()
    print("environment:", " ".join(sorted(os.environ)), flush=True)
    if MODE == "sleep":
        time.sleep(600)
    if MODE == "raise":
        raise ValueError("boom from the tiny script")
    if MODE == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
    model = Tiny(session.vocab_size, DIM).to(session.device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    accum = TOTAL_BATCH_SIZE // (DEVICE_BATCH_SIZE * session.seq_len)
    batches = session.train_batches(DEVICE_BATCH_SIZE)
    step = 0
    while not session.done and MODE != "no-finish":
        step += 1
        for _ in range(accum):
            x, y = next(batches)
            with session.autocast():
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if MODE == "nan" and step >= 2:
            loss = loss * float("nan")
        session.tick(loss.item())
    if MODE == "exit":
        raise SystemExit(3)
    if MODE != "no-finish":
        session.finish(model)


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """HYBRID_DATA_DIR for the whole session, with the `test` profile prepared (builtin corpus)."""
    from harness.data import prepare
    from harness.profiles import get_profile

    path = tmp_path_factory.mktemp("data")
    mp = pytest.MonkeyPatch()
    mp.setenv("HYBRID_DATA_DIR", str(path))
    prepare(get_profile("test"), log=lambda line: None)
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def prepared_test(data_dir):
    from harness.data import prepared
    from harness.profiles import get_profile

    return prepared(get_profile("test"))


@pytest.fixture(scope="session")
def tiny_train_py(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "train.py"
    path.write_text(TINY_TRAIN_PY)
    return path
