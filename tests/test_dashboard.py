"""The trial database opens in optuna-dashboard unchanged: studies, trials and their attributes over its HTTP API."""
from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna_dashboard
import pytest
from test_loop import FakeObjective

import hybrid.loop
from hybrid import store
from hybrid.cli import main


class Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dashboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A study of 6 trials (one failed), served by optuna-dashboard on a random loopback port: its base URL."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hybrid.loop, "make_objective", lambda *a, **k: FakeObjective())
    assert main(["run", "--method", "tpe", "--study", "s", "--trials", "6", "--profile", "test"]) == 0
    app = optuna_dashboard.wsgi(store.open_storage("sqlite:///runs/hybrid.db"))
    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()
    server.server_close()


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_studies_and_trials_with_their_attributes_are_listed(dashboard: str) -> None:
    studies = get(f"{dashboard}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["s"]
    detail = get(f"{dashboard}/api/studies/{studies[0]['study_id']}")
    assert {a["key"] for a in detail["user_attrs"]} >= {store.RUN_KEY, store.SPACE_KEY}
    trials = detail["trials"]
    assert [t["number"] for t in trials] == list(range(6))
    assert [t["state"] for t in trials] == ["Complete"] * 6
    attrs = [{a["key"]: a["value"] for a in t["user_attrs"]} for t in trials]
    assert attrs[0]["source"] == "baseline" and {a["source"] for a in attrs[1:]} == {"tpe"}
    assert [a["status"] for a in attrs] == ["ok", "ok", "ok", "oom", "ok", "ok"]
    assert all({"generation", "code_sha", "total_seconds", "log_path", "seed", "method"} <= a.keys() for a in attrs)
    assert trials[3]["values"] == [100.0] and len(trials[0]["params"]) == 14
    assert {a["key"] for a in detail["union_user_attrs"]} >= {"source", "status", "val_bpb", "total_seconds"}


def test_the_dashboard_page_and_plots_render(dashboard: str) -> None:
    with urllib.request.urlopen(f"{dashboard}/dashboard", timeout=30) as response:
        assert response.status == 200 and b"<html" in response.read().lower()
    studies = get(f"{dashboard}/api/studies")["study_summaries"]
    importances = get(f"{dashboard}/api/studies/{studies[0]['study_id']}/param_importances")
    assert importances["param_importances"]
