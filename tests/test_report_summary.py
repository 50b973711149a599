"""clients/report.py's loop summary from a run directory's files: the learner's drop counts are summed."""

from __future__ import annotations

import json

from flywheel.clients.report import loop_summary


def test_summary_sums_the_learners_selection_counts_only_where_logged(tmp_path):
    (tmp_path / "train").mkdir()
    rows = [
        {
            "step": 1,
            "dropped_stale": 1,
            "dropped_overlong": 2,
            "dynamic_dropped_groups": 1,
            "dynamic_dropped_rollouts": 4,
        },
        {
            "step": 2,
            "dropped_stale": 0,
            "dropped_overlong": 3,
            "dynamic_dropped_groups": 2,
            "dynamic_dropped_rollouts": 7,
        },
    ]
    (tmp_path / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = loop_summary(tmp_path)
    assert out["steps"] == 2 and out["dropped_stale"] == 1 and out["dropped_overlong"] == 5
    assert out["dynamic_dropped_groups"] == 3 and out["dynamic_dropped_rollouts"] == 11
    assert "overlong_penalised" not in out  # not configured in this run: not reported as 0
