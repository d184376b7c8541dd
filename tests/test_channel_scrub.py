"""The channel to agent processes reads bounded, checked data; text from a trial is scrubbed of the trusted side's
secrets and cut to a bounded excerpt (harness.channel, harness.scrub, harness.agent_process.TrialLog)."""
from __future__ import annotations

import io
import json
import os

import pytest

import harness.scrub
from harness.agent_process import LOG_HEAD, LOG_TAIL, TrialLog
from harness.channel import MAX_HEADER, Channel, ChannelError
from harness.scrub import REDACTED, register, scrub


def reading(data: bytes) -> Channel:
    """A channel that receives `data` (and sends into a buffer nobody reads)."""
    return Channel(io.BytesIO(data), io.BytesIO())


def test_a_message_and_its_payload_go_through():
    r, w = os.pipe()
    sender = Channel(io.BytesIO(), os.fdopen(w, "wb", buffering=0))
    receiver = Channel(os.fdopen(r, "rb"), io.BytesIO())
    try:
        sender.send({"op": "batch", "rows": 2}, b"\x01\x02\x03")
        sender.send({"op": "tick", "loss": 3.5})
        assert receiver.receive(max_payload=3) == ({"op": "batch", "rows": 2, "bytes": 3}, b"\x01\x02\x03")
        assert receiver.receive() == ({"op": "tick", "loss": 3.5, "bytes": 0}, b"")
        sender.close()
        with pytest.raises(ChannelError, match="closed"):
            receiver.receive()
    finally:
        sender.close()
        receiver.close()


def test_an_oversized_header_is_refused():
    with pytest.raises(ChannelError, match=f"over {MAX_HEADER} bytes"):
        reading(b'{"op": "' + b"x" * MAX_HEADER + b'"}\n').receive(max_payload=1 << 30)


def test_a_payload_over_the_maximum_is_refused():
    line = json.dumps({"op": "logits", "bytes": 11}).encode() + b"\n" + b"x" * 11
    assert reading(line).receive(max_payload=11)[1] == b"x" * 11
    with pytest.raises(ChannelError, match="at most 10 expected"):
        reading(line).receive(max_payload=10)


@pytest.mark.parametrize("line", [b"not json\n", b"{'op': 'tick'}\n", b"\xff\xfe\n"])
def test_a_header_that_is_not_json_is_refused(line):
    with pytest.raises(ChannelError, match="not JSON"):
        reading(line).receive()


@pytest.mark.parametrize("size", ['-1', 'true', '"8"', '1.5', 'null'])
def test_a_byte_count_that_is_not_a_count_is_refused(size):
    with pytest.raises(ChannelError, match="bytes"):
        reading(b'{"op": "x", "bytes": ' + size.encode() + b"}\n").receive(max_payload=100)


def test_a_message_cut_short_is_refused():
    with pytest.raises(ChannelError, match="mid-message"):
        reading(b'{"op": "x", "bytes": 8}\n1234').receive(max_payload=100)
    with pytest.raises(ChannelError, match="closed"):
        reading(b"").receive()


def test_sending_to_a_closed_process_is_a_channel_error():
    r, w = os.pipe()
    os.close(r)
    channel = Channel(io.BytesIO(), os.fdopen(w, "wb", buffering=0))
    with pytest.raises(ChannelError, match="gone"):
        channel.send({"op": "tick"}, b"x" * 100)
    channel.close()


@pytest.fixture
def no_registered(monkeypatch):
    monkeypatch.setattr(harness.scrub, "_registered", set())


def test_environment_values_are_redacted(monkeypatch, no_registered):
    monkeypatch.setenv("DATABASE_URL", "postgresql://optimizer:pg-planted-pw@db.internal:5432/trials")
    monkeypatch.setenv("PLAIN_SETTING", "looks-harmless-but-is-ours")
    text = ("connect postgresql://optimizer:pg-planted-pw@db.internal:5432/trials failed; password pg-planted-pw, "
            "login optimizer:pg-planted-pw; also looks-harmless-but-is-ours")
    out = scrub(text)
    assert "pg-planted-pw" not in out and "looks-harmless-but-is-ours" not in out
    assert out.count(REDACTED) == 4 and out.startswith("connect [redacted] failed")


def test_registered_values_and_url_passwords_are_redacted(no_registered):
    register("sk-registered-key-0123", "postgresql://alice:hunter2222@db/x", None, "")
    out = scrub("key sk-registered-key-0123; url postgresql://alice:hunter2222@db/x; pw hunter2222; alice:hunter2222")
    assert "sk-registered" not in out and "hunter2222" not in out and out.count(REDACTED) == 4


def test_paths_short_values_and_allowed_names_are_kept(monkeypatch, tmp_path, no_registered):
    monkeypatch.setenv("SOME_FOLDER", str(tmp_path))
    monkeypatch.setenv("SOME_FOLDERS", f"{tmp_path}:{tmp_path.parent}")
    monkeypatch.setenv("SHORT_ONE", "abc12")  # under MIN_SECRET: not worth hiding
    monkeypatch.setenv("LANG", "C.UTF-8-planted-locale")  # allow-listed: the trial sees it anyway
    text = f"saved to {tmp_path}/model.pt, flag abc12, locale C.UTF-8-planted-locale"
    assert scrub(text) == text


def test_scrubbed_text_is_bounded(monkeypatch, no_registered):
    monkeypatch.setenv("PLANTED_VALUE", "value-at-the-end")
    text = "x" * 1000 + " value-at-the-end"
    out = scrub(text, 50)
    assert out.startswith("[...] ") and len(out) <= 50 + len("[...] ") and out.endswith(f"x {REDACTED}")
    assert scrub("short", 50) == "short"


def test_a_trial_log_keeps_head_and_tail_scrubbed(monkeypatch, tmp_path, no_registered):
    monkeypatch.setenv("PLANTED_VALUE", "planted-secret-in-output")
    log = TrialLog(tmp_path / "log.txt")
    log.write(b"first line planted-secret-in-output\n")
    log.write(b"half a line")
    assert (tmp_path / "log.txt").read_text() == f"first line {REDACTED}\n"  # written as it comes, by whole lines
    log.write(b"\n")
    for _ in range(3 * (LOG_HEAD + LOG_TAIL) // 4096):
        log.write(b"y" * 4095 + b"\n")
    log.note("the last word")
    log.close()
    text = (tmp_path / "log.txt").read_text()
    assert text.startswith(f"first line {REDACTED}\n") and text.endswith("harness: the last word\n")
    assert "bytes of output cut" in text and "planted-secret" not in text
    assert len(text) < LOG_HEAD + 2 * LOG_TAIL
