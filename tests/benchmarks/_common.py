"""Helpers shared by the benchmark scripts: machine info, medians, aligned tables, the JSON result file.

Not a benchmark itself; the scripts import it as ``_common`` (their own folder is first on ``sys.path``
when run as ``python tests/benchmarks/<name>.py``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_out(name: str) -> Path:
    """``bench-results/<name>.json`` relative to the current directory."""
    return Path("bench-results") / f"{name}.json"


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run with tiny settings "
                        "(checks the script works; the numbers mean nothing)")
    parser.add_argument("--out", type=Path, default=default_out(name),
                        help=f"JSON result file (default: {default_out(name)}, relative to the current directory)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (torch.set_num_threads); 0 = leave torch's default")


def add_set_arg(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"{what} config override, YAML value, e.g. --set {example} (repeatable)")


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as ``{dotted key: YAML-parsed value}``; a malformed item exits with a message."""
    import yaml

    over: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        over[key.strip()] = yaml.safe_load(value)
    return over


def unseen_characters(names: Sequence[str], given: str | None) -> list[str]:
    """The characters held out of the online-learning detector: ``--new`` (comma list) or, by default, every 4th
    name (sorted) from the 3rd: a fixed rule, not a choice by result. Unknown names exit with a message."""
    new = [s.strip() for s in given.split(",")] if given else list(names[2::4])
    unknown = [n for n in new if n not in names]
    if unknown:
        raise SystemExit(f"--new: not holo20 characters: {', '.join(unknown)}")
    return new


def apply_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def machine_info(device: Any = "cpu") -> dict[str, Any]:
    """Platform, CPU count, library versions, torch threads and the device the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    for mod in ("torchvision", "timm", "accelerate", "animeai"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - version reporting must never fail a benchmark
            info[mod] = None
    try:
        import subprocess

        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        info["git_commit"] = commit.stdout.strip() or None
    except Exception:  # noqa: BLE001
        info["git_commit"] = None
    return info


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy the repeats were (0.05 = 5 %)."""
    if len(values) < 2:
        return 0.0
    m = median(values)
    return (max(values) - min(values)) / m if m else float("nan")


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """Print (and return) an aligned plain-text table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_looks_numeric(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(cells[0]))
    out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in cells[1:]]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def _looks_numeric(s: str) -> bool:
    s = s.strip().rstrip("%x").lstrip("+-")
    return s in ("-", "nan", "inf") or s.replace(".", "", 1).isdigit()


def write_json(path: Path, name: str, settings: dict[str, Any], results: dict[str, Any],
               machine: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": settings,
        "results": results,
    }
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
    return path
