"""docs/benchmarks.md's summary is generated from the sections' own summary rows (bench/common.py)."""

from __future__ import annotations

import bench.common as common


def test_summary_is_generated_from_the_latest_section_of_each_title(tmp_path, monkeypatch):
    report = tmp_path / "benchmarks.md"
    monkeypatch.setattr(common, "REPORT", report)
    common.append_report("Speed", "first run", [{"claim": "qps", "figure": "10", "target": "≥ 30", "holds": "no"}])
    common.append_report("Memory", "no rows in this one")
    common.append_report("Speed", "second run", [{"claim": "qps", "figure": "31", "target": "≥ 30", "holds": "yes"}])
    text = report.read_text()
    summary = text.split(common.SUMMARY_START)[1].split(common.SUMMARY_END)[0]
    assert "| 31 | ≥ 30 | yes |" in summary and "| 10 |" not in summary  # the latest Speed section only
    assert "Memory (" in summary and "see the section" in summary
    assert text.count(common.SUMMARY_START) == 1 and text.count("first run") == 1 and text.count("second run") == 1
    # a hand edit inside the block does not survive the next run
    report.write_text(text.replace("| 31 | ≥ 30 | yes |", "| 99 | ≥ 30 | yes |"))
    common.write_summary()
    assert "| 99 |" not in report.read_text() and "| 31 | ≥ 30 | yes |" in report.read_text()
