"""Shared helpers for the benchmark scripts: machine description and BENCHMARKS.md section updates."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "BENCHMARKS.md"


def machine() -> str:
    """The device, and on CPU the model, family/model numbers and vector ISA: two "AMD EPYC" machines of one
    cloud kind differ by 2x (Zen 4 with AVX-512 against Zen 3 with AVX2), so the name alone does not say which."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']} model {info.get('model', '?')})"
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{cpu}, {isa}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def stamp() -> str:
    """Machine, commit, date and the 1-minute load average (other jobs on the same cores slow every figure)."""
    load = f" Load average: {os.getloadavg()[0]:.1f}." if hasattr(os, "getloadavg") else ""
    return (f"Machine: {machine()}. Commit: {commit()}. Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC."
            + load)


def update_section(name: str, body: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in BENCHMARKS.md (append if absent)."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
