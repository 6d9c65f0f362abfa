"""semiseg's CAML against the official training log: the same logged terms, on the real LA data, at the paper's patch.

The official CAML repository publishes the log of its LA runs (`model/LA_CAML_<n>_.../caml3d_v1/log.txt`): for each
of 15,000 iterations `loss`, `loss_s` (supervised Dice of f_v plus f_a), `loss_c` (mutual consistency), `loss_o`
(OCC), and the test Dice of every checkpoint it kept. This script

    python benchmarks/caml_logs.py extract --official /path/to/CAML     # the official numbers into results/
    python benchmarks/caml_logs.py run --until 100 --out /work/la-runs/caml-paper-la8   # resumable, background
    python benchmarks/caml_logs.py compare --run /work/la-runs/caml-paper-la8          # figure + BENCHMARKS.md

extracts the official numbers (numbers only, no code) into benchmarks/results/caml_official_log_la<n>.csv, trains
`caml --preset la-8` at 112x112x80 with every iteration logged, stopping after a checkpoint at or beyond `--until`
(repeat the command to go further: it resumes exactly), and plots semiseg's terms over the official ones. semiseg
logs `loss/supervised`, `loss/mutual`, `loss/occ` and the total under the official definitions (same reductions and
weights), so the curves are comparable term by term; the seeds and sample order differ, so only the level and trend
within the seed noise can agree, not the values of one iteration.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown_table, stamp, update_section  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
LINE = re.compile(r"iteration (\d+) : loss : ([-\d.e]+), loss_s: ([-\d.e]+), loss_c: ([-\d.e]+), loss_o: ([-\d.e]+)")
SAVED = re.compile(r"iter_(\d+)_dice_([\d.]+)\.pth")
TERMS = {"loss": "loss", "loss_s": "loss/supervised", "loss_c": "loss/mutual", "loss_o": "loss/occ"}
KEEP = 2000  # official iterations kept in the results file (the CPU run reaches a few hundred at most)
WINDOWS = ((1, 25), (26, 50), (51, 75), (76, 100), (101, 200), (201, 400))


def official_log(checkout: Path, labeled: int) -> str:
    """The log text from a checkout, or from a bare clone (read with git show, no work tree needed)."""
    found = sorted(checkout.glob(f"model/LA_CAML_{labeled}_*/caml3d_v1/log.txt"))
    if found:
        return found[0].read_text()
    names = subprocess.run(["git", "-C", str(checkout), "ls-tree", "-r", "--name-only", "HEAD"], capture_output=True,
                           text=True).stdout.splitlines()
    wanted = [n for n in names if re.fullmatch(rf"model/LA_CAML_{labeled}_[^/]*/caml3d_v1/log\.txt", n)]
    if not wanted:
        raise SystemExit(f"error: {checkout}: no model/LA_CAML_{labeled}_*/caml3d_v1/log.txt; pass the official "
                         "CAML checkout or clone (github.com/Herschel555/CAML)")
    return subprocess.run(["git", "-C", str(checkout), "show", f"HEAD:{wanted[0]}"], capture_output=True, text=True,
                          check=True).stdout


def parse_official(text: str) -> tuple[list[dict[str, float]], list[tuple[int, float]]]:
    """Per-iteration terms and the (iteration, test Dice) of every checkpoint the official run kept."""
    rows = [{"iteration": int(m[1]), **{k: float(v) for k, v in zip(TERMS, m.groups()[1:])}}
            for m in LINE.finditer(text)]
    saved = [(int(m[1]), float(m[2])) for m in SAVED.finditer(text)]
    return rows, saved


def extract(args: argparse.Namespace) -> None:
    checkout = Path(args.official)
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    for labeled in (4, 8, 16):
        rows, saved = parse_official(official_log(checkout, labeled))
        out = RESULTS / f"caml_official_log_la{labeled}.csv"
        with open(out, "w", newline="") as f:
            f.write(f"# official CAML log, LA {labeled} labels, Herschel555/CAML commit {commit}, first {KEEP} of "
                    f"{len(rows)} iterations; checkpoints kept (iteration:test Dice): "
                    + " ".join(f"{i}:{d:.4f}" for i, d in saved) + "\n")
            writer = csv.DictWriter(f, fieldnames=["iteration", *TERMS])
            writer.writeheader()
            writer.writerows(rows[:KEEP])
        print(f"{out.relative_to(REPO)}: {min(KEEP, len(rows))} iterations, {len(saved)} checkpoints")


def read_official(labeled: int) -> tuple[list[dict[str, float]], str]:
    path = RESULTS / f"caml_official_log_la{labeled}.csv"
    with open(path) as f:
        header = f.readline().lstrip("# ").strip()
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)], header


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if (out / "checkpoint.pt").exists():
        cmd = [sys.executable, "-m", "semiseg.cli", "train", "--out", str(out), "--resume", "--quiet"]
    else:
        cmd = [sys.executable, "-m", "semiseg.cli", "train", "--method", "caml", "--preset", f"la-{args.labeled}",
               "--data", args.data, "--out", str(out), "--quiet",
               *[a for s in ("log_every=1", f"checkpoint_every={args.checkpoint_every}", "num_workers=1",
                             "device=cpu") for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        while proc.poll() is None:
            time.sleep(10)
            if checkpoint_iteration(out) >= args.until:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    print(f"{out}: checkpoint at iteration {checkpoint_iteration(out)}")


def checkpoint_iteration(run_dir: Path) -> int:
    """The iteration of the run's checkpoint, read from its log (the last record at a checkpoint multiple)."""
    log, cfg = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not (log.is_file() and cfg.is_file() and (run_dir / "checkpoint.pt").is_file()):
        return 0
    import yaml

    every = int(yaml.safe_load(cfg.read_text())["checkpoint_every"])
    its = [json.loads(line)["iteration"] for line in log.read_text().splitlines() if line.strip()]
    return max((i for i in its if i % every == 0), default=0)


def compare(args: argparse.Namespace) -> None:
    from figures import FIGURES, plot_terms

    official, header = read_official(args.labeled)
    records = [json.loads(line) for line in (Path(args.run) / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    ours = [r for r in records if "loss/supervised" in r]
    if not ours:
        raise SystemExit(f"error: {args.run}: no logged iterations yet; run `caml_logs.py run` first")
    n = max(r["iteration"] for r in ours)
    series = {f"official (seed 3407, GPU), {header.split(',')[1].strip()}":
              {t: [(int(r["iteration"]), r[t]) for r in official if r["iteration"] <= max(n, 200)] for t in TERMS},
              f"semiseg (seed 3407, CPU), {n} iterations":
              {t: [(int(r["iteration"]), r[k]) for r in ours] for t, k in TERMS.items()}}
    figure = plot_terms(series, FIGURES / f"caml_official_vs_semiseg_la{args.labeled}.png",
                        f"CAML LA-{args.labeled}, 112x112x80: logged terms, official log vs semiseg")
    rows = []
    for lo, hi in WINDOWS:
        if lo > n:
            break
        a = [r for r in official if lo <= r["iteration"] <= hi]
        b = [r for r in ours if lo <= r["iteration"] <= hi]
        rows.append([f"{lo}-{min(hi, n)}", *(f"{np.mean([r[t] for r in a]):.3f} ± {np.std([r[t] for r in a]):.3f}"
                                             f" / {np.mean([r[k] for r in b]):.3f} ± {np.std([r[k] for r in b]):.3f}"
                                             for t, k in TERMS.items())])
    table = markdown_table(["iterations", *[f"{t} official / semiseg" for t in TERMS]], rows)
    body = (f"{stamp()}\n\nCommands: `python benchmarks/caml_logs.py run --until N --out RUN` (repeated; it "
            f"resumes) and `python benchmarks/caml_logs.py compare --run RUN`; the official numbers: {header}.\n\n"
            f"Mean ± std of each logged term over windows of iterations (official log / semiseg, {n} iterations "
            f"run so far on this CPU):\n\n{table}\n\n![CAML terms]({figure.relative_to(REPO)})\n")
    update_section(f"caml-official-log-la{args.labeled}", body)
    print(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("extract", help="official log numbers into benchmarks/results/")
    p.add_argument("--official", required=True, help="a checkout of github.com/Herschel555/CAML")
    p = sub.add_parser("run", help="train caml at the paper's patch, every iteration logged, resumable")
    p.add_argument("--out", required=True)
    p.add_argument("--until", type=int, default=100, help="stop after the first checkpoint at or beyond N")
    p.add_argument("--labeled", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--data", default=os.environ.get("SEMISEG_LA_ROOT", str(REPO.parent / "shared/data/LA")))
    p = sub.add_parser("compare", help="figure and BENCHMARKS.md table")
    p.add_argument("--run", required=True)
    p.add_argument("--labeled", type=int, default=8)
    args = parser.parse_args()
    {"extract": extract, "run": run, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
