"""What the benchmark scripts share: the record header every JSON starts with (benchmark, device,
library versions, git sha, date, load average), the JSON writer under ``benchmarks/results/``,
device timing, and the ``--device`` and ``--out`` options.

Every script runs from the repository root as ``python -m benchmarks.<name>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from engine.export import package_versions, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so host clocks time it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn):
    """(fn(), its seconds), synchronised with the device on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def git_sha() -> str:
    """HEAD's sha, with ``+dirty`` when tracked files other than results and docs differ from it
    (the code that ran is not HEAD's)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results", ":!*.md")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if changed else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def now() -> str:
    """The local date and time as the records write it."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def report_header(benchmark: str, device: torch.device) -> dict:
    """What a device benchmark's JSON starts with: which benchmark, device, versions, git sha, date."""
    return {"benchmark": benchmark, "device": device_name(device), "device_type": device.type,
            "versions": package_versions(), "git_sha": git_sha(), "date": now(),
            "load_average_at_start": os.getloadavg()[0]}  # other work on the machine skews CPU timings


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)


def previous_results(out: Path, world: str) -> list[dict]:
    """The rows already in ``out``, which a rerun replaces row by row; only rows measured on the
    same toy world (``world``: ``engine.toyworld.world.world_name``): rows of two worlds in one
    table would not compare."""
    if not out.is_file():
        return []
    report = json.loads(out.read_text())
    if report.get("world") != world:
        raise SystemExit(f"{out} holds results of the toy world {report.get('world')}, not {world}: "
                         "pass another --out, or move that file away")
    return report["results"]


def result_path(out: str | None, default_name: str) -> Path:
    """``--out`` if given, else ``benchmarks/results/<default_name>``."""
    return Path(out) if out else RESULTS / default_name


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser, described by the first line of its docstring."""
    return argparse.ArgumentParser(description=doc.split("\n")[0])


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=default_device())


def add_out_argument(parser: argparse.ArgumentParser, default_name: str) -> None:
    """``--out``: the JSON path; ``default_name`` (under benchmarks/results/, may name placeholders)
    is what the help shows."""
    parser.add_argument("--out", help=f"JSON path (default benchmarks/results/{default_name})")
