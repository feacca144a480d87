"""Benchmark result files never hold NaN or Infinity (JSON has neither): write_result writes them
as strings."""

from __future__ import annotations

import json
import math

from taxiway.benchmarks import json_safe, write_result


def test_write_result_turns_non_finite_numbers_into_strings(tmp_path, capsys):
    result = {"bw": float("nan"), "rate": math.inf, "runs": [{"p99": -math.inf, "ok": 1.5}],
              "t": (float("nan"), 2)}
    out = tmp_path / "r.json"
    write_result(result, str(out))
    back = json.loads(out.read_text())  # strict parsers accept it: no NaN token
    assert back == {"bw": "nan", "rate": "inf", "runs": [{"p99": "-inf", "ok": 1.5}], "t": ["nan", 2]}
    assert "NaN" not in out.read_text() and "Infinity" not in capsys.readouterr().out
    assert json_safe({"a": [1, 2.0]}) == {"a": [1, 2.0]}
