"""The structural lease: one worker at a time makes a study's structural moves (new generations, verdicts).

The lease is a study system attribute {holder, expires}, changed only by compare-and-set statements on its
row (an INSERT that the unique key refuses, an UPDATE or DELETE conditioned on the value read), which SQLite,
PostgreSQL and MySQL all make atomic. A worker that dies holding it blocks nobody past its expiry.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

import optuna
from optuna.storages import RDBStorage
from sqlalchemy import delete, exc, insert, select, update

from hybrid.study import optuna_compat

LEASE_KEY = "hybrid.lease"
LEASE_SECONDS = float(os.environ.get("HYBRID_LEASE_SECONDS", 900))  # longer than any structural move (an LLM call)
_TABLE = optuna_compat.study_system_attrs_table()


def _rdb(study: optuna.Study) -> RDBStorage:
    storage = optuna_compat.backend(optuna_compat.storage(study))  # behind optuna's cache
    if not isinstance(storage, RDBStorage):
        raise TypeError(f"the structural lease needs an RDB storage, got {type(storage).__name__}")
    return storage


class StructuralLease:
    """try_acquire() / renew() / release() of the study's lease for this worker (holder: host, pid and a nonce)."""

    def __init__(self, study: optuna.Study, seconds: float = LEASE_SECONDS) -> None:
        self.engine = _rdb(study).engine
        self.study_id = optuna_compat.study_id(study)
        self.seconds = seconds
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._mine: str | None = None  # the exact value we wrote, for the conditional release

    def _where(self):  # noqa: ANN202
        return (_TABLE.c.study_id == self.study_id) & (_TABLE.c.key == LEASE_KEY)

    def current(self) -> dict[str, Any] | None:
        """The lease as stored ({holder, expires}), or None when nobody ever took it or it was released."""
        with self.engine.connect() as conn:
            row = conn.execute(select(_TABLE.c.value_json).where(self._where())).first()
        return json.loads(row[0]) if row else None

    def try_acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours; False if another live worker holds it."""
        return self._set(renewing=False)

    def renew(self) -> bool:
        """Extend the lease if this worker still holds it (to be checked before writing what it guards)."""
        return self._set(renewing=True)

    def _set(self, *, renewing: bool) -> bool:
        value = json.dumps({"holder": self.holder, "expires": time.time() + self.seconds})
        with self.engine.connect() as conn:
            row = conn.execute(select(_TABLE.c.value_json).where(self._where())).first()
        if renewing and (row is None or json.loads(row[0])["holder"] != self.holder):
            return False
        try:
            with self.engine.begin() as conn:
                if row is None:
                    conn.execute(insert(_TABLE).values(study_id=self.study_id, key=LEASE_KEY, value_json=value))
                else:
                    held = json.loads(row[0])
                    if held["holder"] != self.holder and held["expires"] > time.time():
                        return False
                    done = conn.execute(update(_TABLE).where(self._where() & (_TABLE.c.value_json == row[0]))
                                        .values(value_json=value))
                    if done.rowcount != 1:
                        return False  # someone else changed it since we read it
        except exc.IntegrityError:
            return False  # someone else inserted it since we read it
        self._mine = value
        return True

    def release(self) -> None:
        """Give the lease back, unless it expired and someone else took it meanwhile."""
        if self._mine is None:
            return
        with self.engine.begin() as conn:
            conn.execute(delete(_TABLE).where(self._where() & (_TABLE.c.value_json == self._mine)))
        self._mine = None
