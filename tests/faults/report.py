"""Figures the fault suite measured, for RELIABILITY.md: one JSON line per fault scenario."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def record(fault: str, **figures: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    line = {"fault": fault, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    with open(ARTIFACTS / "reliability.jsonl", "ab") as out:
        out.write(orjson.dumps(line, option=orjson.OPT_NON_STR_KEYS) + b"\n")
