"""LA-mini: the LA protocol scaled down to run on a 2-core CPU in minutes per method.

The real LA cases are downsampled by 2 (image: Gaussian anti-aliasing with sigma 0.5 then every second voxel;
label: every second voxel, i.e. nearest), cached once. Same 80/20 split, 8 labelled + 72 unlabelled, patch
64x64x32 (the halved 56x56x40 is not a multiple of 16, which the VNet needs), stride halved to 9/9/2, reduced
filter count, a fixed iteration budget with every iteration-based schedule of a method scaled by budget / recipe
iterations (method parameters whose name ends in `iterations` or `horizon`, e.g. ramp-up epoch lengths and
pre-training stages, and the common `poly_horizon`, `lr_step`, `lr_step_start`; schedules defined as fractions of
the run, such as poly decay and CrossMatch's threshold ramp, follow the budget by themselves), the last
checkpoint, and the four metrics on the 20 test cases. Labelled-only with all 80 labels is the upper bound.

    python benchmarks/la_mini.py --methods supervised caml mlrpl crossmatch --iterations 240 --seeds default 2 3

`--seeds` repeats every run with each seed (`default`: the method's own, 1337 or its preset's): at this budget
the seed moves Dice by tens of points, so single runs do not rank methods. Writes benchmarks/results/la_mini.csv
(one row per run) and two sections of BENCHMARKS.md: `la-mini` (every run, with its stamp) and `la-mini-seeds`
(mean and sample standard deviation over the seeds of each setting run with more than one).

`--finish-by TIME` (UTC, `HH:MM` today or an ISO date-time): a session's machine and its run folders do not outlive
the session, so a run that cannot finish by then is worth nothing. Every training is watched: from its 50th new
iteration on, the fastest of its last 3 logged s/iteration projects the finish (plus `--finish-margin` minutes for
the last evaluations);
a run projected past TIME is stopped (SIGTERM: it writes a checkpoint and exits) and the next setting is tried,
so one queue per core packs what fits:

    taskset -c 1 python benchmarks/la_mini.py --methods bcp mean_teacher dtc --no-upper-bound --iterations 3000 \
        --val 8 --val-every 300 --checkpoint-every 250 --work /work/la-runs --finish-by 11:25
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown_table, stamp, update_section  # noqa: E402
from figures import validation_points  # noqa: E402

CASES_DIR = "2018LA_Seg_Training Set"
RESULTS = REPO / "benchmarks" / "results"
CSV_PATH = RESULTS / "la_mini.csv"
CURVES = RESULTS / "la_mini_curves"
FIELDS = ["method", "variant", "labeled", "iterations", "n_filters", "seed", "val", "dice", "jaccard", "hd95", "asd",
          "train_wall_s", "wall_s", "s_per_it", "peak_mb", "overrides", "curve", "stamp"]
SEED = re.compile(r"(?:^| )seed=(\d+)(?= |$)")


def prepare(la_root: Path, out: Path) -> Path:
    """Downsample every LA case by 2 into `out` (LA layout); skipped when already complete."""
    from semiseg.data.h5 import read_case, write_case

    if (out / "test.list").is_file():
        return out
    ids = [*(la_root / "train.list").read_text().split(), *(la_root / "test.list").read_text().split()]
    for case_id in ids:
        target = out / CASES_DIR / case_id / "mri_norm2.h5"
        if target.is_file():
            continue
        case = read_case(la_root / CASES_DIR / case_id / "mri_norm2.h5", case_id, 2)
        image = ndimage.gaussian_filter(case.image[0], sigma=0.5)[::2, ::2, ::2]
        write_case(target, np.ascontiguousarray(image), np.ascontiguousarray(case.label[::2, ::2, ::2]))
    for name in ("train.list", "test.list"):
        (out / name).write_text((la_root / name).read_text())
    return out


def scaled_overrides(method: str, iterations: int) -> list[str]:
    from semiseg.config import scaled_schedules
    from semiseg.methods import get_method

    preset = "la-8" if "la-8" in get_method(method).presets else None
    return [f"{k}={v}" for k, v in scaled_schedules(method, iterations, preset).items()]


class PastDeadline(Exception):
    """A training stopped because its projected finish lies past `--finish-by`."""


def parse_deadline(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """`HH:MM` (UTC, today) or an ISO date-time (UTC unless it says otherwise) as an aware datetime."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        if re.fullmatch(r"\d{1,2}:\d{2}", text):
            hour, minute = map(int, text.split(":"))
            return now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"--finish-by {text!r}: give HH:MM (UTC, today) or an ISO date-time") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def projected_finish(records: list[dict], iterations: int, start_iteration: int, now: dt.datetime,
                     margin_s: float, min_new: int = 50) -> dt.datetime | None:
    """When a run logging `records` (metrics.jsonl) reaches `iterations`, plus `margin_s`, at the fastest of its
    last 3 logged s/iteration (a few minutes of another job on its core must not stop a run that can finish);
    None until it has logged `min_new` iterations past `start_iteration` (the iteration it started or resumed at),
    so that start-up and a resumed run's first window do not decide."""
    timed = [r for r in records if "s_per_it" in r and "iteration" in r and r["iteration"] > start_iteration]
    if not timed or timed[-1]["iteration"] < start_iteration + min_new:
        return None
    rate = min(r["s_per_it"] for r in timed[-3:])
    return now + dt.timedelta(seconds=(iterations - timed[-1]["iteration"]) * rate + margin_s)


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    return out


def supervise(cmd: list[str], metrics: Path, iterations: int, deadline: dt.datetime | None, margin_s: float,
              poll_s: float = 30.0) -> None:
    """Run `cmd` (a training that logs into `metrics`) to its end; with a deadline, stop it (SIGTERM, then wait
    for its checkpoint) as soon as its projected finish lies past the deadline, and raise PastDeadline."""
    start = max((r.get("iteration", 0) for r in _records(metrics)), default=0)
    proc = subprocess.Popen(cmd)
    while True:
        try:
            code = proc.wait(timeout=poll_s if deadline else None)
            break
        except subprocess.TimeoutExpired:
            now = dt.datetime.now(dt.UTC)
            finish = projected_finish(_records(metrics), iterations, start, now, margin_s)
            if finish is not None and finish > deadline:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                raise PastDeadline(f"projected to finish at {finish:%H:%M} UTC, after --finish-by "
                                   f"{deadline:%H:%M} UTC; stopped with a checkpoint") from None
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)


def run_one(method: str, labeled: int, iterations: int, data: Path, out: Path, n_filters: int,
            extra: list[str], val: int = 0, val_every: int = 0, checkpoint_every: int = 0,
            deadline: dt.datetime | None = None, margin_s: float = 300.0) -> dict:
    from semiseg.methods import get_method

    preset = ["--preset", "la-8"] if "la-8" in get_method(method).presets else []
    common = ["patch_size=64,64,32", "stride=9,9,2", f"n_filters={n_filters}",
              f"checkpoint_every={checkpoint_every or iterations}", "log_every=50", "num_workers=1", "device=cpu"]
    if val:  # the calibrated protocol: a learning curve on validation cases carved from the training list
        common += [f"val={val}", f"val_every={val_every or iterations}", "channels_last=on"]
    sets = [*common, *scaled_overrides(method, iterations), *extra]
    cmd = [sys.executable, "-m", "semiseg.cli", "train", "--method", method, "--data", str(data), "--labeled",
           str(labeled), "--iterations", str(iterations), "--out", str(out), "--quiet", *preset,
           *[a for s in sets for a in ("--set", s)]]
    if (out / "checkpoint.pt").exists():
        cmd = [sys.executable, "-m", "semiseg.cli", "train", "--out", str(out), "--resume", "--quiet"]
    t0 = time.perf_counter()
    supervise(cmd, out / "metrics.jsonl", iterations, deadline, margin_s)
    wall = time.perf_counter() - t0
    subprocess.run([sys.executable, "-m", "semiseg.cli", "evaluate", str(out), "--out", str(out / "eval-test"),
                    "--device", "cpu"], check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "eval-test" / "summary.json").read_text())
    train = json.loads((out / "train_summary.json").read_text())
    seed = yaml.safe_load((out / "config.yaml").read_text())["seed"]
    m = summary["metrics"]
    train_wall = train.get("total_wall_s", train["wall_s"])  # over every call of a resumed run
    variant = " ".join(e for e in extra if not e.startswith("seed="))
    return {"method": method, "variant": variant or "recipe", "labeled": labeled, "iterations": iterations,
            "n_filters": n_filters, "seed": seed, "val": val, "curve": save_curve(out) if val else "",
            "dice": m["dice"]["mean"], "jaccard": m["jaccard"]["mean"], "hd95": m["hd95"]["mean"],
            "asd": m["asd"]["mean"], "train_wall_s": train_wall, "wall_s": wall, "s_per_it": train_wall / iterations,
            "peak_mb": train["peak_memory_mb"], "overrides": " ".join(_as_run(sets, out))}


def _as_run(sets: list[str], run: Path) -> list[str]:
    """The overrides with the values the run folder's config holds: a run resumed by a later call with other
    options (say `--val-every`) keeps those it started with, and the row says so."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    values = {**cfg.get("params", {}), **cfg}
    out = []
    for item in sets:
        key = item.split("=", 1)[0]
        value = values.get(key, item.split("=", 1)[1])
        out.append(f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["supervised", "caml", "mlrpl", "crossmatch"])
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--labeled", type=int, default=8)
    parser.add_argument("--n-filters", type=int, default=8)
    parser.add_argument("--no-upper-bound", action="store_true", help="skip labelled-only with all 80 labels")
    parser.add_argument("--la-root", default=os.environ.get("SEMISEG_LA_ROOT", str(REPO.parent / "shared/data/LA")))
    parser.add_argument("--work", default=str(REPO / "runs" / "la-mini"))
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="extra key=value override for every run (a diagnostic variant, named in the table)")
    parser.add_argument("--seeds", nargs="+", type=_seed, default=[None],
                        help="run every setting once per seed; `default` is the method's own (1337, CAML's 3407)")
    parser.add_argument("--val", type=int, default=0,
                        help="validation cases carved from the end of train.list: a learning curve every "
                             "--val-every iterations (the calibrated protocol; the upper bound then has 80 - VAL "
                             "labels)")
    parser.add_argument("--val-every", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="iterations between checkpoints (default: only at the end); an interrupted run "
                             "resumes from the last one when the command is repeated")
    parser.add_argument("--rerun", action="store_true", help="run settings that already have a row again")
    parser.add_argument("--finish-by", default=None, metavar="TIME",
                        help="UTC HH:MM (today) or ISO date-time: stop a training projected to end later and try "
                             "the next setting")
    parser.add_argument("--finish-margin", type=float, default=5.0,
                        help="minutes added to a projection for the run's last validation and test evaluation")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: copy the curves of unfinished runs (marked partial), redraw the figures "
                             "and rewrite the BENCHMARKS.md sections")
    args = parser.parse_args()
    work = Path(args.work)
    if args.report:
        report_partial(work)
        return
    deadline = parse_deadline(args.finish_by) if args.finish_by else None
    data = prepare(Path(args.la_root), work / "data")
    n_train = len((data / "train.list").read_text().split())
    jobs = [(m, args.labeled) for m in args.methods]
    if not args.no_upper_bound:
        jobs.append(("supervised", n_train - args.val))
    for seed in args.seeds:
        extra = [*args.extra, *([f"seed={seed}"] if seed is not None else [])]
        for method, labeled in jobs:
            variant = "-".join(e.replace("=", "_").replace(",", "_") for e in extra)
            folder = work / (f"{method}-{labeled}-{args.iterations}" + (f"-val{args.val}" if args.val else "") +
                             (f"-{variant}" if variant else ""))
            done = finished(method, extra, labeled, args.iterations, args.n_filters, args.val)
            if done and not args.rerun:
                print(f"skipping {folder.name}: already in {CSV_PATH.name} ({done['stamp']})", flush=True)
                continue
            if deadline and dt.datetime.now(dt.UTC) + dt.timedelta(minutes=args.finish_margin) > deadline:
                print(f"not started {folder.name}: --finish-by {deadline:%H:%M} UTC is too close", flush=True)
                continue
            try:
                row = run_one(method, labeled, args.iterations, data, folder, args.n_filters, extra, args.val,
                              args.val_every, args.checkpoint_every, deadline, 60 * args.finish_margin)
            except PastDeadline as stop:
                print(f"not finished {folder.name}: {stop}", flush=True)
                continue
            row["stamp"] = stamp()
            write_rows([*read_rows(), row])
            print(json.dumps(row), flush=True)
    print(render())


def finished(method: str, extra: list[str], labeled: int, iterations: int, n_filters: int, val: int) -> dict | None:
    """The CSV row of this setting and seed, if it has run (the benchmark skips it unless --rerun)."""
    variant = " ".join(e for e in extra if not e.startswith("seed=")) or "recipe"
    seed = next((int(e.split("=", 1)[1]) for e in extra if e.startswith("seed=")), None)
    seed = default_seed(method) if seed is None else seed
    for row in read_rows():
        if (row["method"], row["variant"], int(row["labeled"]), int(row["iterations"]), int(row["n_filters"]),
                int(row["seed"]), int(row.get("val") or 0)) == (method, variant, labeled, iterations, n_filters,
                                                                 seed, val):
            return row
    return None


def save_curve(run: Path) -> str:
    """Copy the run's learning curve (validation Dice and the logged losses, with training wall time) into
    benchmarks/results/la_mini_curves/, where the figures are drawn from; returns its path in the repository."""
    CURVES.mkdir(parents=True, exist_ok=True)
    target = CURVES / f"{run.name}.jsonl"
    (CURVES / f"{run.name}-partial.jsonl").unlink(missing_ok=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    target.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(target.relative_to(REPO))


def _seed(text: str) -> int | None:
    return None if text == "default" else int(text)


def default_seed(method: str) -> int:
    """The seed a run gets without `--set seed=...`: the config default, or the method's `la-8` preset's."""
    from semiseg.config import build_config
    from semiseg.methods import get_method

    return build_config(method, preset="la-8" if "la-8" in get_method(method).presets else None).seed


def read_rows() -> list[dict[str, str]]:
    """Every run in la_mini.csv; rows written before the seed column get theirs from the overrides or the default."""
    if not CSV_PATH.exists():
        return []
    with open(CSV_PATH) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        variant = row.get("variant") or "recipe"
        if not row.get("seed"):
            found = SEED.search(row.get("overrides", "")) or SEED.search(variant)
            row["seed"] = found.group(1) if found else str(default_seed(row["method"]))
        row["variant"] = SEED.sub("", variant).strip() or "recipe"
    return rows


def write_rows(rows: list[dict]) -> None:
    """Rewrite la_mini.csv whole (atomically), so older rows take the current columns."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = CSV_PATH.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in FIELDS} for row in rows)
    os.replace(tmp, CSV_PATH)


def _setting(row: dict[str, str]) -> tuple[str, ...]:
    return row["method"], row["variant"], row["labeled"], row["iterations"], row["n_filters"]


def _calibrated(row: dict[str, str]) -> bool:
    """Rows of the calibrated protocol (learning curves on validation cases); the others are the uncalibrated
    240/600-iteration table of the earlier sessions."""
    return int(row.get("val") or 0) > 0


def render() -> str:
    """BENCHMARKS.md sections: every run and the seed statistics, for the uncalibrated table and for the
    calibrated protocol; the calibration verdict; the learning-curve figures."""
    rows = read_rows()
    old = _render_runs([r for r in rows if not _calibrated(r)], "la-mini", "la-mini-seeds")
    new = _render_runs([r for r in rows if _calibrated(r)], "la-mini-cal-runs", "la-mini-cal-seeds")
    verdict = render_calibration()
    render_figures()
    return f"{old}\n\n{new}\n\n{verdict}"


def _render_runs(rows: list[dict[str, str]], runs_section: str, seeds_section: str) -> str:
    runs: dict[tuple[str, ...], dict[str, str]] = {}
    for row in rows:
        runs[(*_setting(row), row["seed"])] = row
    table = markdown_table(
        ["method", "variant", "labelled", "iterations", "filters", "seed", "Dice %", "Jaccard %", "HD95 vox",
         "ASD vox", "wall min", "s/it", "peak MB", "run stamp"],
        [[*_setting(r), r["seed"], f"{100 * float(r['dice']):.2f}", f"{100 * float(r['jaccard']):.2f}",
          f"{float(r['hd95']):.2f}", f"{float(r['asd']):.2f}", f"{float(r['wall_s']) / 60:.1f}",
          f"{float(r['s_per_it']):.2f}", f"{float(r['peak_mb']):.0f}", r["stamp"]] for r in runs.values()])
    update_section(runs_section, "Command: `python benchmarks/la_mini.py --methods METHOD ... --iterations N "
                   "[--seeds S ...]` (one row per setting and seed, the latest run; every row's machine, commit and "
                   f"date is in its stamp).\n\n{table}\n")
    settings: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for row in runs.values():
        settings.setdefault(_setting(row), []).append(row)
    summary = markdown_table(
        ["method", "variant", "labelled", "iterations", "filters", "seeds", "Dice %", "Jaccard %", "HD95 vox",
         "ASD vox", "Dice % of each seed"],
        [[*key, " ".join(r["seed"] for r in group),
          *(_mean_std(group, m) for m in ("dice", "jaccard", "hd95", "asd")),
          " / ".join(f"{100 * float(r['dice']):.1f}" for r in group)]
         for key, group in settings.items() if len(group) > 1])
    update_section(seeds_section, "Mean ± sample standard deviation over the seeds of every setting run with more "
                   "than one (from the rows of the table above; `--seeds S ...` adds them).\n\n" + summary + "\n")
    return f"{table}\n\n{summary}"


def read_curve(name: str) -> list[dict]:
    path = CURVES / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def curve_files() -> dict[str, list[dict]]:
    """Every saved learning curve by run name (finished runs, and `-partial` ones copied by --report)."""
    return {p.stem: read_curve(p.stem) for p in sorted(CURVES.glob("*.jsonl"))}


CAL_RUN = re.compile(r"^supervised-(?P<labeled>\d+)-(?P<iterations>\d+)-val(?P<val>\d+)(?:-seed_(?P<seed>\d+))?"
                     r"(?P<partial>-partial)?$")
MIN_GAP = 6.0  # Dice points: the calibration's required mean gap between all labels and 8 labels
SMOOTH = 3  # validation points in the trailing mean of the smoothed verdict


def calibration_table(curves: dict[str, list[dict]], low: int = 8) -> list[dict]:
    """At every validation iteration seen by all seeds: labelled-only with `low` labels against the most labels.

    With the recipe's constant learning rate the weights at iteration t of a longer run are those of a t-iteration
    run, so each validation point is the result of that budget. A budget passes when the mean gap is at least
    MIN_GAP points and every seed with all labels is above every seed with `low` labels."""
    groups: dict[int, dict[int, dict[int, float]]] = {}
    for name, records in curves.items():
        match = CAL_RUN.match(name)
        if not match:
            continue
        seed = int(match["seed"] or 1337)
        by_it = {it: dice for it, _, dice in validation_points(records)}
        groups.setdefault(int(match["labeled"]), {})[seed] = by_it
    if low not in groups or len(groups) < 2:
        return []
    high = max(groups)
    lo, hi = groups[low], groups[high]
    seeds = sorted(set(lo) & set(hi))
    if not seeds:
        return []
    common = sorted(set.intersection(*(set(lo[s]) for s in seeds), *(set(hi[s]) for s in seeds)))
    table = []
    for i, it in enumerate(common):
        a = np.array([100 * lo[s][it] for s in seeds])
        b = np.array([100 * hi[s][it] for s in seeds])
        gap = float(b.mean() - a.mean())
        # The last iterate at a constant learning rate moves by several points between validation points: the
        # trailing mean of each seed's last SMOOTH points is the steadier reading of the same budget.
        window = common[max(0, i - SMOOTH + 1):i + 1]
        a_s = np.array([np.mean([100 * lo[s][t] for t in window]) for s in seeds])
        b_s = np.array([np.mean([100 * hi[s][t] for t in window]) for s in seeds])
        gap_s = float(b_s.mean() - a_s.mean())
        table.append({"iteration": it, "low": a, "high": b, "gap": gap, "separated": bool(b.min() > a.max()),
                      "passes": bool(gap >= MIN_GAP and b.min() > a.max()), "seeds": seeds, "n_high": high,
                      "gap_smoothed": gap_s,
                      "passes_smoothed": bool(gap_s >= MIN_GAP and b_s.min() > a_s.max())})
    return table


def render_calibration() -> str:
    table = calibration_table(curve_files())
    if not table:
        body = "No calibration curves yet (`--val` runs of labelled-only with 8 and all labels)."
    else:
        first = next((r["iteration"] for r in table if r["passes"]), None)
        stable = next((r["iteration"] for i, r in enumerate(table) if all(x["passes"] for x in table[i:])), None)
        seeds = " ".join(map(str, table[0]["seeds"]))
        rows = [[str(r["iteration"]), _ms(r["low"]), " / ".join(f"{v:.1f}" for v in r["low"]), _ms(r["high"]),
                 " / ".join(f"{v:.1f}" for v in r["high"]), f"{r['gap']:+.1f}", "yes" if r["separated"] else "no",
                 "**pass**" if r["passes"] else "fail", f"{r['gap_smoothed']:+.1f}",
                 "**pass**" if r["passes_smoothed"] else "fail"] for r in table]
        stable_s = next((r["iteration"] for i, r in enumerate(table)
                         if all(x["passes_smoothed"] for x in table[i:])), None)
        n_high = table[0]["n_high"]
        verdict = (f"First budget that passes: **{first}** iterations; passes at every later point from "
                   f"**{stable}** iterations." if stable else
                   f"First budget that passes: {first} iterations, but not at every later point." if first else
                   f"**No budget up to {table[-1]['iteration']} iterations passes.**")
        verdict += (f" On the trailing mean of each seed's last {SMOOTH} validation points: passes at every point "
                    f"from **{stable_s}** iterations." if stable_s else
                    f" On the trailing mean of each seed's last {SMOOTH} validation points: not at every later "
                    "point.")
        body = (f"Validation Dice (8 cases held out of train.list) of labelled-only with 8 and {n_high} labels, "
                f"seeds {seeds}, at every validation point. Criterion: mean gap >= {MIN_GAP:.0f} points and every "
                f"{n_high}-label seed above every 8-label seed. {verdict}\n\n" + markdown_table(
                    ["iteration", "8 labels mean ± std", "each seed", f"{n_high} labels mean ± std", "each seed",
                     "gap", "separated", "verdict", f"gap, {SMOOTH}-point mean", f"verdict, {SMOOTH}-point mean"],
                    rows))
    test = test_calibration(read_rows())
    if test:
        n_high = test[0]["n_high"]
        rows = [[str(r["iteration"]), " ".join(map(str, r["seeds"])), _ms(r["low"]),
                 " / ".join(f"{v:.1f}" for v in r["low"]), _ms(r["high"]), " / ".join(f"{v:.1f}" for v in r["high"]),
                 f"{r['gap']:+.1f}", "yes" if r["separated"] else "no", "**pass**" if r["passes"] else "fail"]
                for r in test]
        body += (f"\n\nThe same criterion on the **test** Dice (the 20 cases of test.list) of the last checkpoint "
                 f"of each finished run, labelled-only with 8 and {n_high} labels (the figure every ranking row "
                 "reports; it chooses no checkpoint of any method, it says whether the benchmark resolves its own "
                 "bounds at that budget):\n\n" + markdown_table(
                     ["iterations", "seeds", "8 labels mean ± std", "each seed", f"{n_high} labels mean ± std",
                      "each seed", "gap", "separated", "verdict"], rows))
    update_section("la-mini-calibration", body + "\n")
    return body


def test_calibration(rows: list[dict[str, str]], low: int = 8) -> list[dict]:
    """Per budget: the calibration criterion on the test Dice of the finished labelled-only runs of the calibrated
    protocol (`--val`), 8 labels against the most labels, over the seeds both have."""
    groups: dict[int, dict[int, dict[int, float]]] = {}
    for row in rows:
        if row["method"] == "supervised" and row["variant"] == "recipe" and int(row.get("val") or 0) > 0:
            groups.setdefault(int(row["iterations"]), {}).setdefault(int(row["labeled"]), {})[int(row["seed"])] = \
                100 * float(row["dice"])
    table = []
    for iterations, by_labels in sorted(groups.items()):
        if low not in by_labels or len(by_labels) < 2:
            continue
        high = max(by_labels)
        seeds = sorted(set(by_labels[low]) & set(by_labels[high]))
        if not seeds:
            continue
        a = np.array([by_labels[low][s] for s in seeds])
        b = np.array([by_labels[high][s] for s in seeds])
        gap = float(b.mean() - a.mean())
        table.append({"iteration": iterations, "seeds": seeds, "low": a, "high": b, "gap": gap, "n_high": high,
                      "separated": bool(b.min() > a.max()), "passes": bool(gap >= MIN_GAP and b.min() > a.max())})
    return table


def _ms(values: np.ndarray) -> str:
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def render_figures() -> list[Path]:
    """One figure per (iterations, validation) protocol: every run's validation Dice against iteration and time."""
    from figures import FIGURES, plot_validation_curves

    groups: dict[str, dict[str, list[dict]]] = {}
    for name, records in curve_files().items():
        match = re.search(r"-(\d+)-val(\d+)", name)
        if match and validation_points(records):
            groups.setdefault(f"{match[1]}-val{match[2]}", {})[name] = records
    return [plot_validation_curves(curves, FIGURES / f"la_mini_{key}.png",
                                   f"LA-mini validation Dice, budget {key.split('-')[0]} iterations")
            for key, curves in groups.items()]


def report_partial(work: Path) -> None:
    """Copy the curves of runs still in progress under `work` (marked -partial) and render every section."""
    for run in sorted(work.glob("*-val*")):
        log = run / "metrics.jsonl"
        if log.is_file() and not (run / "eval-test" / "summary.json").is_file():
            CURVES.mkdir(parents=True, exist_ok=True)
            (CURVES / f"{run.name}-partial.jsonl").write_text(log.read_text())
    print(render())


def _mean_std(rows: list[dict[str, str]], metric: str) -> str:
    values = np.array([float(r[metric]) for r in rows]) * (100.0 if metric in ("dice", "jaccard") else 1.0)
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


if __name__ == "__main__":
    main()
