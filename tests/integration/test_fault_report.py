"""The script that turns the fault suite's JSON into the table of docs/reliability.md."""

from __future__ import annotations

import json

import pytest

from tests.integration.fault_report import BEGIN, END, main


def test_the_table_is_rendered_between_the_markers(tmp_path):
    report = tmp_path / "faults.json"
    report.write_text(json.dumps({"meta": {"commit": "abc1234", "date": "2026-01-01", "machine": "x"},
                                  "rows": [{"fault": "Redis restarted", "streams": 3, "lost": 0,
                                            "duplicated": 0, "recover_s": 1.5, "note": "exact"}]}))
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    assert main([str(report), "--update", str(doc)]) == 0
    text = doc.read_text()
    assert "old table" not in text and text.endswith("\n\nafter\n")
    assert "| Redis restarted | 3 | 0 | 0 | 1.5 | exact |" in text and "commit abc1234" in text
    doc.write_text("no markers")
    with pytest.raises(SystemExit, match="no <!-- fault-table:begin -->"):
        main([str(report), "--update", str(doc)])
