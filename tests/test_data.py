import io
import json
import os
import random
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness import data
from harness.prepared import Prepared
from harness.profiles import get_profile
from hybrid.errors import UserError

TINY = replace(get_profile("test"), name="tiny", seq_len=16, eval_tokens=64, eval_batch_tokens=64, vocab_size=300)
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(5, 60))).capitalize() + "." for _ in range(n)]


def parquet_bytes(texts: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf)
    return buf.getvalue()


def test_builtin_prepared(prepared_test):
    meta = json.loads((prepared_test.tokens / "meta.json").read_text())
    assert prepared_test.corpus == "builtin" and prepared_test.vocab_size == 2048
    assert meta["tokens"]["val"] > 2 * get_profile("cpu").eval_tokens
    assert meta["tokens"]["train"] > 1_000_000
    val = pq.read_table(prepared_test.root / "val").column("text").to_pylist()
    train = pq.read_table(prepared_test.root / "train").column("text").to_pylist()
    for name in ("CASSIUS", "PROSPERO"):  # julius-caesar and the-tempest are held out
        assert any(name in t for t in val) and not any(name in t for t in train)
    assert max(map(len, train)) < 4 * data.PASSAGE_CHARS
    starts = np.load(prepared_test.tokens / "val.idx.npy")
    tokens = np.memmap(prepared_test.tokens / "val.bin", dtype=np.uint16, mode="r")
    assert starts[-1] == len(tokens) == meta["tokens"]["val"]
    assert (tokens[starts[:-1]] == 2047).all()  # every document starts with BOS


def test_prepare_is_idempotent_and_shared(prepared_test):
    mtimes = {p: p.stat().st_mtime_ns for p in prepared_test.root.rglob("*") if p.is_file()}
    lines = []
    p = data.prepare(get_profile("test"), "builtin", log=lines.append)
    assert p == prepared_test and len(lines) == 1  # only the summary line
    assert {p: p.stat().st_mtime_ns for p in prepared_test.root.rglob("*") if p.is_file()} == mtimes
    assert data.prepared(get_profile("cpu")) == prepared_test  # cpu shares corpus and vocabulary


PREPARE_IN_A_PROCESS = """
import sys
from harness.data import prepare, prepared
from harness.profiles import get_profile
prepare(get_profile("test"), "builtin", log=lambda line: print(line, flush=True))
print("ready", prepared(get_profile("test")).root)
"""


def test_two_processes_preparing_at_once_build_it_once(tmp_path):
    """Two runs (or test workers) that prepare the same empty data folder together: one builds, the other waits and
    finds it built."""
    env = {**os.environ, "HYBRID_DATA_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE_IN_A_PROCESS], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("wrote " in out for out in outputs) == 1, outputs  # the documents were written by one of them
    assert all(f"ready {tmp_path / 'builtin'}" in out for out in outputs)
    assert not list(tmp_path.glob("builtin/*.tmp"))


def test_a_pointer_written_with_the_old_key_still_reads(tmp_path):
    """prepared-<profile>.json names the corpus under `corpus`; one written before, under `source`, still reads."""
    written = Prepared("builtin", 2048, tmp_path).to_dict()
    assert written == {"corpus": "builtin", "vocab_size": 2048, "root": str(tmp_path)}
    assert Prepared.from_dict(json.loads(json.dumps(written))) == Prepared("builtin", 2048, tmp_path)
    old = {"source": "builtin", "vocab_size": 2048, "root": str(tmp_path)}
    assert Prepared.from_dict(old) == Prepared("builtin", 2048, tmp_path)

def test_prepared_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="hybrid prepare --profile cpu"):
        data.prepared(get_profile("cpu"))


def test_passages():
    text = "\n\n".join(f"para {i} " + "x" * 300 for i in range(10))
    parts = data.passages(text, 1000)
    assert all(len(p) <= 1000 for p in parts) and len(parts) == 4
    assert "\n\n".join(parts) == text
    assert data.passages("one " * 400, 100) == ["one " * 399 + "one"]  # a long paragraph stays whole


def test_local_corpora(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_DATA_DIR", str(tmp_path / "data"))
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("\n\n".join(documents(40, 1)))
    (corpus / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in documents(100, 2)))
    pq.write_table(pa.table({"text": documents(30, 3)}), corpus / "c.parquet")
    (corpus / "notes.md").write_text("ignored")
    p = data.prepare(TINY, str(corpus), log=lambda line: None)
    assert p.corpus.startswith("local-corpus-") and p.vocab_size == 300
    meta = json.loads((p.tokens / "meta.json").read_text())
    assert meta["documents"]["train"] > meta["documents"]["val"] > 0
    assert data.prepared(TINY) == p
    glob_p = data.prepare(TINY, str(corpus / "**" / "*.jsonl"), log=lambda line: None)
    assert glob_p.corpus != p.corpus and glob_p.tokenizer.exists()


def test_local_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(UserError, match="no such file or folder"):
        data.prepare(TINY, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt, .jsonl or .parquet"):
        data.prepare(TINY, str(tmp_path / "empty"))
    (tmp_path / "empty" / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match="empty"):
        data.prepare(TINY, str(tmp_path / "empty"))
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(UserError, match="'text' field"):
        data.prepare(TINY, str(tmp_path / "bad.jsonl"))


@pytest.fixture
def shard_server():
    """A local HTTP server with shards 0, 1 and 3 (validation); shard 1 fails once with a 500."""
    files = {f"/shard_{i:05d}.parquet": parquet_bytes(documents(200, 10 + i)) for i in (0, 1, 3)}
    requests: list[str] = []
    failing = {"/shard_00001.parquet"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path in failing:
                failing.discard(self.path)
                self.send_error(500)
            elif self.path in files:
                self.send_response(200)
                self.send_header("Content-Length", str(len(files[self.path])))
                self.end_headers()
                self.wfile.write(files[self.path])
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def test_climbmix_download(tmp_path, monkeypatch, shard_server):
    url, requests = shard_server
    monkeypatch.setenv("HYBRID_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HYBRID_CLIMBMIX_URL", url)
    monkeypatch.setenv("HYBRID_CLIMBMIX_SHARDS", "2")
    monkeypatch.setenv("HYBRID_CLIMBMIX_VAL_SHARD", "3")
    monkeypatch.setattr(data, "BACKOFF", 0.01)
    p = data.prepare(TINY, "climbmix", log=lambda line: None)
    assert sorted(f.name for f in (p.root / "train").iterdir()) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [f.name for f in (p.root / "val").iterdir()] == ["shard_00003.parquet"]
    assert requests.count("/shard_00001.parquet") == 2  # retried after the 500
    assert pq.read_table(p.root / "val" / "shard_00003.parquet").num_rows == 200
    assert not list(p.root.rglob("*.tmp"))
    n = len(requests)
    data.prepare(TINY, "climbmix", log=lambda line: None)
    assert len(requests) == n  # nothing downloaded again


def test_climbmix_missing_shard(tmp_path, monkeypatch, shard_server):
    url, _ = shard_server
    monkeypatch.setenv("HYBRID_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HYBRID_CLIMBMIX_URL", url)
    monkeypatch.setenv("HYBRID_CLIMBMIX_SHARDS", "3")  # shard 2 is not served: a 404 is not retried
    monkeypatch.setenv("HYBRID_CLIMBMIX_VAL_SHARD", "3")
    with pytest.raises(UserError, match="shard_00002.parquet after 1 attempt"):
        data.prepare(TINY, "climbmix", log=lambda line: None)


def test_climbmix_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HYBRID_CLIMBMIX_URL", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr(data, "BACKOFF", 0.01)
    with pytest.raises(UserError, match="climbmix needs network.*use --source builtin"):
        data.prepare(TINY, "climbmix", log=lambda line: None)
