"""Corpora, tokenizer and token cache: everything `hybrid prepare` builds under data_dir()/<corpus-id>/.

    <corpus-id>/train/*.parquet, val/*.parquet   documents, one `text` column
    <corpus-id>/tokenizer-<vocab>.pkl            BPE ranks + split pattern
    <corpus-id>/tokens-<vocab>/                  {train,val}.bin (uint16 ids, every document starts with BOS),
                                                 {train,val}.idx.npy (document starts, plus the end), meta.json

Corpora: `builtin` (Shakespeare, shipped in harness/corpus), `climbmix` (downloaded), or a local PATH.
"""
from __future__ import annotations

import fcntl
import glob
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from harness.loader import pack_rows
from harness.prepared import Prepared
from harness.profiles import Profile, data_dir
from harness.tokenizer import Tokenizer, train_tokenizer
from harness.errors import UserError

BUILTIN_CORPUS = Path(__file__).with_name("corpus") / "shakespeare.jsonl.gz"
BUILTIN_VAL_PLAYS = ("julius-caesar", "the-tempest")  # held out whole: about 73k tokens at vocab 2048
PASSAGE_CHARS = 1000     # scenes and .txt files are cut at blank lines into documents of about this size
VAL_FRACTION = 0.1       # of a local corpus: its last documents, in file order
SHARD_DOCS = 50_000      # documents per parquet shard we write
CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_TRAIN_SHARDS = 10   # shards 0..N-1 ($HYBRID_CLIMBMIX_SHARDS); a 300 s gpu trial reads about 0.5 B tokens
CLIMBMIX_VAL_SHARD = 6542    # the last shard, pinned for validation ($HYBRID_CLIMBMIX_VAL_SHARD)
RETRIES, BACKOFF = 5, 1.0    # download attempts, first wait in seconds (doubles)
TOKENIZER_CHARS, TOKENIZER_DOC_CHARS = 1_000_000_000, 10_000  # what the BPE trainer reads at most
ENCODE_BATCH = 8192      # documents per multi-threaded encode call
EXTENSIONS = (".txt", ".jsonl", ".parquet")
PREPARE_LOCK = ".prepare.lock"  # in the data folder: one `prepare` at a time
Log = Callable[[str], None]


def prepare(profile: Profile, corpus: str | None = None, log: Log = print) -> Prepared:
    """Build (or find) the documents, tokenizer and token cache of a corpus for a profile; skips what exists. One
    process at a time per data folder (a file lock): others wait, then find what it built."""
    root = data_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / PREPARE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare(profile, corpus or profile.corpus, log)


def _prepare(profile: Profile, corpus: str, log: Log) -> Prepared:
    t0 = time.time()
    if corpus == "builtin":
        p = _prepared("builtin", profile)
        if not _has_splits(p.root):
            _write_builtin(p.root, log)
    elif corpus == "climbmix":
        p = _prepared("climbmix", profile)
        _download_climbmix(p.root, log)
    else:
        files = _local_files(corpus)
        p = _prepared(_local_id(corpus, files), profile)
        if not _has_splits(p.root):
            _write_local(files, p.root, log)
    tokenizer = _tokenizer(p, log)
    meta = _cache_tokens(p, tokenizer, log)
    _check_val(p, profile)
    pointer = data_dir() / f"prepared-{profile.name}.json"
    written = pointer.with_suffix(".tmp")
    written.write_text(json.dumps(p.to_dict()))
    written.replace(pointer)  # a reader never sees half of it
    log(f"prepared {p.corpus} for profile {profile.name} in {time.time() - t0:.1f}s: "
        f"{meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens, vocab {p.vocab_size}, in {p.root}")
    return p


def prepared(profile: Profile) -> Prepared:
    """The data `hybrid prepare` built for this profile (or its default corpus); UserError if there is none."""
    pointer = data_dir() / f"prepared-{profile.name}.json"
    p = Prepared.from_dict(json.loads(pointer.read_text())) if pointer.exists() else _prepared(profile.corpus, profile)
    if not (p.tokens / "meta.json").exists():
        raise UserError(f"no prepared data for profile {profile.name}: run `hybrid prepare --profile {profile.name}` first")
    return p


def _prepared(corpus_id: str, profile: Profile) -> Prepared:
    return Prepared(corpus_id, profile.vocab_size, data_dir() / corpus_id)


def _has_splits(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "val").is_dir()


# -- documents ----------------------------------------------------------------------------------------------

def passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Text cut at blank lines into passages of at most max_chars (a longer paragraph stays whole)."""
    out, current = [], ""
    for para in re.split(r"\n\s*\n", text.strip()):
        if not para.strip():
            continue
        if current and len(current) + 2 + len(para) > max_chars:
            out.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    return out + [current] if current else out


def _write_splits(root: Path, train: list[str], val: list[str], log: Log) -> None:
    """Both splits as parquet shards, each folder written aside and renamed into place."""
    for split, docs in (("val", val), ("train", train)):
        tmp, final = root / f"{split}.tmp", root / split
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i in range(0, len(docs), SHARD_DOCS):
            pq.write_table(pa.table({"text": docs[i:i + SHARD_DOCS]}), tmp / f"shard_{i // SHARD_DOCS:05d}.parquet")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    log(f"wrote {len(train):,} train and {len(val):,} val documents "
        f"({sum(map(len, train)) / 1e6:.1f} + {sum(map(len, val)) / 1e6:.1f} M characters) to {root}")


def _write_builtin(root: Path, log: Log) -> None:
    train, val = [], []
    with gzip.open(BUILTIN_CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            scene = json.loads(line)
            (val if scene["play"] in BUILTIN_VAL_PLAYS else train).extend(passages(scene["text"]))
    log(f"builtin: Shakespeare's plays, {', '.join(BUILTIN_VAL_PLAYS)} held out for validation")
    _write_splits(root, train, val, log)


def _local_files(corpus: str) -> list[Path]:
    path = Path(corpus).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"{corpus}: no such file or folder (use builtin, climbmix, or a folder/glob of .txt/.jsonl/.parquet)")
    files = [f for f in files if f.suffix in EXTENSIONS]
    if not files:
        raise UserError(f"{corpus}: no .txt, .jsonl or .parquet files there")
    return files


def _local_id(corpus: str, files: list[Path]) -> str:
    """local-<name>-<hash of the path and of every file's size and mtime>: a changed corpus is prepared anew."""
    h = hashlib.sha1(str(Path(corpus).expanduser().resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(corpus).name or "corpus").strip("_.")[:40] or "corpus"
    return f"local-{name}-{h.hexdigest()[:8]}"


def _read_documents(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return passages(path.read_text(encoding="utf-8", errors="replace"))
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
        return docs
    try:
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowInvalid, KeyError) as e:
        raise UserError(f"{path}: cannot read a 'text' column ({str(e).splitlines()[0]})") from None


def _write_local(files: list[Path], root: Path, log: Log) -> None:
    docs = [d for f in files for d in _read_documents(f) if isinstance(d, str) and d.strip()]
    if len(docs) < 2:
        raise UserError(f"the corpus in {files[0].parent} is empty" if not docs else
                        f"{files[0]}: one document is not enough for a train and a validation split")
    total, held, cut = sum(map(len, docs)), 0, len(docs)
    while cut > 1 and held < VAL_FRACTION * total:
        cut -= 1
        held += len(docs[cut])
    log(f"local corpus: {len(files)} file(s), {len(docs):,} documents, the last {len(docs) - cut:,} held out for validation")
    _write_splits(root, docs[:cut], docs[cut:], log)


# -- climbmix -----------------------------------------------------------------------------------------------

def _download(url: str, dest: Path) -> Path:
    """One file, fetched to dest.tmp, checked to be parquet, renamed; retried with exponential backoff."""
    tmp = dest.with_name(dest.name + ".tmp")
    error: Exception | None = None
    for attempt in range(RETRIES):
        if attempt:
            time.sleep(BACKOFF * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
            pq.ParquetFile(tmp)  # a truncated download fails here
            tmp.replace(dest)
            return dest
        except urllib.error.HTTPError as e:
            error = e
            if e.code in (401, 403, 404):
                break
        except (OSError, pa.ArrowInvalid) as e:
            error = e
    tmp.unlink(missing_ok=True)
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        raise UserError(f"climbmix needs network: cannot reach {url} ({error.reason}); use --source builtin")
    raise UserError(f"could not download {url} after {attempt + 1} attempt(s): {error}")


def _download_climbmix(root: Path, log: Log) -> None:
    base = os.environ.get("HYBRID_CLIMBMIX_URL", CLIMBMIX_URL).rstrip("/")
    n_train = int(os.environ.get("HYBRID_CLIMBMIX_SHARDS", CLIMBMIX_TRAIN_SHARDS))
    val = int(os.environ.get("HYBRID_CLIMBMIX_VAL_SHARD", CLIMBMIX_VAL_SHARD))
    if not 0 < n_train <= val:
        raise UserError(f"HYBRID_CLIMBMIX_SHARDS must be between 1 and {val} (the validation shard), got {n_train}")
    jobs = [(i, root / "train") for i in range(n_train)] + [(val, root / "val")]
    todo = [(f"{base}/shard_{i:05d}.parquet", folder / f"shard_{i:05d}.parquet") for i, folder in jobs
            if not (folder / f"shard_{i:05d}.parquet").exists()]
    if not todo:
        return
    for folder in (root / "train", root / "val"):
        folder.mkdir(parents=True, exist_ok=True)
    log(f"climbmix: downloading {len(todo)} of {len(jobs)} shards from {base}")
    done = [_download(*todo[0])]  # one alone first: without network this fails after the retries, once
    log(f"  {done[0].parent.name}/{done[0].name} ({done[0].stat().st_size / 1e6:.1f} MB) [1/{len(todo)}]")
    with ThreadPoolExecutor(4) as pool:
        for path in pool.map(lambda job: _download(*job), todo[1:]):
            done.append(path)
            log(f"  {path.parent.name}/{path.name} ({path.stat().st_size / 1e6:.1f} MB) [{len(done)}/{len(todo)}]")


# -- tokenizer and token cache ------------------------------------------------------------------------------

def text_batches(folder: Path, rows: int = ENCODE_BATCH) -> Iterator[list[str]]:
    """The documents of a split's parquet shards, in order, in lists of up to `rows`."""
    for path in sorted(folder.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows, columns=["text"]):
            yield [t for t in batch.column(0).to_pylist() if t]


def _tokenizer(p: Prepared, log: Log) -> Tokenizer:
    if p.tokenizer.exists():
        return Tokenizer.load(p.tokenizer)
    t0 = time.time()

    def texts() -> Iterator[str]:
        budget = TOKENIZER_CHARS
        for batch in text_batches(p.root / "train"):
            for text in batch:
                yield text[:TOKENIZER_DOC_CHARS]
                budget -= min(len(text), TOKENIZER_DOC_CHARS)
                if budget <= 0:
                    return

    tokenizer = train_tokenizer(texts(), p.vocab_size)
    tokenizer.save(p.tokenizer)
    log(f"trained a {p.vocab_size}-token BPE tokenizer in {time.time() - t0:.1f}s: {p.tokenizer}")
    return tokenizer


def _cache_tokens(p: Prepared, tokenizer: Tokenizer, log: Log) -> dict:
    """Each split tokenized once into {split}.bin (uint16) + {split}.idx.npy; meta.json is written last."""
    shards = {split: sorted(f.name for f in (p.root / split).glob("*.parquet")) for split in ("train", "val")}
    meta_path = p.tokens / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["shards"] == shards:
            return meta
    if tokenizer.vocab_size > 2**16:
        raise UserError(f"vocab_size {tokenizer.vocab_size} does not fit the uint16 token cache")
    p.tokens.mkdir(parents=True, exist_ok=True)
    meta = {"corpus": p.corpus, "vocab_size": p.vocab_size, "shards": shards, "tokens": {}, "documents": {}}
    for split in ("train", "val"):
        t0, starts, total = time.time(), [np.zeros(1, dtype=np.int64)], 0
        tmp = p.tokens / f"{split}.bin.tmp"
        with open(tmp, "wb") as f:
            for texts in text_batches(p.root / split):
                docs = tokenizer.encode(texts)
                lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
                ids = itertools.chain.from_iterable(itertools.chain((tokenizer.bos_id,), d) for d in docs)
                f.write(np.fromiter(ids, dtype=np.uint16, count=int(lengths.sum())).tobytes())
                starts.append(total + np.cumsum(lengths))
                total += int(lengths.sum())
        if total == 0:
            raise UserError(f"the {split} split of {p.corpus} is empty")
        np.save(p.tokens / f"{split}.idx.npy", np.concatenate(starts))
        tmp.replace(p.tokens / f"{split}.bin")
        meta["tokens"][split], meta["documents"][split] = total, sum(len(s) for s in starts) - 1
        log(f"tokenized {split}: {total:,} tokens, {meta['documents'][split]:,} documents in {time.time() - t0:.1f}s")
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def _check_val(p: Prepared, profile: Profile) -> None:
    """The validation split must fill the profile's eval_tokens with BOS-aligned rows."""
    rows_needed = -(-profile.eval_tokens // profile.seq_len)
    starts = np.load(p.tokens / "val.idx.npy")
    rows = sum(1 for _ in itertools.islice(pack_rows(starts, profile.seq_len + 1), rows_needed))
    if rows < rows_needed:
        raise UserError(f"the validation split of {p.corpus} packs into {rows * profile.seq_len:,} tokens at sequence "
                        f"{profile.seq_len}, profile {profile.name} scores {profile.eval_tokens:,}: use a larger corpus")
