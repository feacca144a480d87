"""Turns the fault suite's figures (the JSON its tests write when TAXIWAY_FAULT_REPORT is set)
into the markdown table of docs/reliability.md; nothing in that table is typed by hand.

    TAXIWAY_FAULT_REPORT=/tmp/faults.json python -m pytest -q tests/integration/test_faults_*.py
    python -m tests.integration.fault_report /tmp/faults.json --update docs/reliability.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BEGIN, END = "<!-- fault-table:begin -->", "<!-- fault-table:end -->"


def render(report: dict) -> str:
    meta = report.get("meta", {})
    lines = [f"Measured by the fault suite at commit {meta.get('commit', '?')} on "
             f"{meta.get('date', '?')} ({meta.get('machine', '?')}).", "",
             "| fault | streams in flight | tokens lost | tokens duplicated | time to recover (s) | what happened |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['fault']} | {row['streams']} | {row['lost']} | {row['duplicated']} | "
                     f"{row['recover_s']} | {row.get('note', '')} |")
    return "\n".join(lines)


def update(doc: Path, table: str) -> None:
    text = doc.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} markers")
    doc.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", help="the JSON the fault suite wrote")
    parser.add_argument("--update", metavar="DOC.md", help="replace the table between the markers")
    args = parser.parse_args(argv)
    table = render(json.loads(Path(args.report).read_text()))
    if args.update:
        update(Path(args.update), table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
