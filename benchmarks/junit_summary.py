"""Summarise a pytest JUnit XML file as JSON (counts and one line per test): ``junit_summary.py IN.xml OUT.json``.

Used by benchmarks/gpu_run.sh so that the GPU run's test results travel back as one small JSON.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET


def summarise(xml_path: str) -> dict:
    """Counts per outcome and every test's outcome, time and message (first 400 characters)."""
    tests = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = (el.get("message") or el.text or "")[:400]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "time_s": round(float(case.get("time") or 0), 2), "message": msg})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "failed": counts["failed"] + counts["error"], "tests": tests}


if __name__ == "__main__":
    result = summarise(sys.argv[1])
    with open(sys.argv[2], "w") as f:
        json.dump(result, f, indent=1)
    print(result["counts"])
