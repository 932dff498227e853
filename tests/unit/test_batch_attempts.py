"""The per-node batch attempt counter the predictors use to fail a poison batch (pipeline.predict)."""

from __future__ import annotations

import pickle

from pipeline.predict import BatchAttempts


def test_counts_starts_per_batch_and_run_and_forgets_a_returned_batch(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    one, other = BatchAttempts("run-1"), BatchAttempts("run-2")
    assert [one.begin("g#0"), one.begin("g#0"), one.begin("g#1"), other.begin("g#0")] == [1, 2, 1, 1]
    # What an actor restarted after a kill sees: a fresh copy of the counter, the count so far kept.
    assert pickle.loads(pickle.dumps(one)).begin("g#0") == 3
    one.end("g#0")
    assert one.begin("g#0") == 1
    for key in ("g#0", "g#1"):
        one.end(key)
        other.end(key)
    one.end("never-started")  # a batch that never started ends quietly
    assert not list((tmp_path / "drcr-batch-attempts").iterdir())
