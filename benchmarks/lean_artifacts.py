"""Lean artifacts: the exported model file of every method against its evaluated network's fp32 weights, and the
peak resident memory of `semiseg evaluate` on LA test volumes, before and after lean loading.

    python benchmarks/lean_artifacts.py --la ../shared/data/LA --cases 2 --work /tmp/lean --before a5b5541 --update-md

1. A dataset folder with the LA training list and the first `--cases` test volumes (symlinks into `--la`).
2. One run folder per method (`--methods`), trained for `--iterations` iterations at the paper's sizes (la-8 recipe,
   112x112x80 patch, 16 filters), unless already there: the sizes, not the training, decide the memory (CAML's
   memory bank is allocated at its first step). The runs use a stride of 56x56x40 so that each volume needs 12
   windows instead of the protocol's 45-54; the peak memory does not depend on the number of windows.
3. `semiseg export` of each run; then `semiseg evaluate` of the run folder with the code of `--before` (a commit,
   extracted with `git archive`) and with this checkout, and of the exported file, each in its own process, whose
   peak resident set (`ru_maxrss`) is read when it exits. The per-case metrics of the three must be identical.

Methods already measured in `--work` (its results.json) are skipped, so an interrupted call continues.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, markdown_table, stamp, update_section

METHODS = ["supervised", "mean_teacher", "uamt", "mcnet", "mcnet_plus", "bcp", "mlrpl", "crossmatch", "caml"]
STRIDE = "56,56,40"
# CrossMatch's la-8 step (batch 2+4) needs about 12 GB; its checkpoint holds no batch-sized state, so a 1+2 batch
# gives the same run folder sizes.
TRAIN_EXTRA = {"crossmatch": ["--set", "batch_labeled=1", "--set", "batch_unlabeled=2"]}
CASES_DIR = "2018LA_Seg_Training Set"


def subset(la: Path, cases: int, out: Path) -> Path:
    """The LA layout with the whole training list and only the first `cases` test volumes."""
    if (out / "test.list").is_file():
        return out
    (out / CASES_DIR).mkdir(parents=True, exist_ok=True)
    train = (la / "train.list").read_text().split()
    test = (la / "test.list").read_text().split()[:cases]
    for case in train + test:
        link = out / CASES_DIR / case
        if not link.exists():
            link.symlink_to((la / CASES_DIR / case).resolve())
    (out / "train.list").write_text("\n".join(train) + "\n")
    (out / "test.list").write_text("\n".join(test) + "\n")
    return out


def before_tree(commit: str, work: Path) -> Path:
    """The package source of `commit`, extracted once (run with PYTHONPATH pointing at its src/)."""
    target = work / f"before-{commit}"
    if not (target / "src" / "semiseg").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", commit, "src"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src"


def measured(args: list[str], log: Path, pythonpath: Path | None = None) -> dict[str, float]:
    """Run `semiseg ARGS` in a fresh process; its peak resident set (MiB), wall time and exit status."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "semiseg.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"peak_mib": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - t0,
            "rc": os.waitstatus_to_exitcode(status)}


def run_method(method: str, data: Path, work: Path, before_src: Path, iterations: int, jobs: int) -> dict:
    run = work / "runs" / method
    if not (run / "checkpoint.pt").is_file():
        preset = [] if method == "supervised" else ["--preset", "la-8"]
        log = work / "logs" / f"{method}-train.log"
        train = measured(["train", "--method", method, *preset, "--data", str(data), "--iterations", str(iterations),
                          "--set", f"stride={STRIDE}", "--set", "num_workers=0", *TRAIN_EXTRA.get(method, []),
                          "--out", str(run), "--quiet"], log)
        if train["rc"] != 0:
            raise SystemExit(f"training {method} failed, see {log}")
    model = work / "models" / f"{method}.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    export = measured(["export", str(run), "--out", str(model)], work / "logs" / f"{method}-export.log")
    if export["rc"] != 0:
        raise SystemExit(f"export of {method} failed, see {work / 'logs' / f'{method}-export.log'}")
    import torch

    from semiseg.nets import evaluated_parameters, portable

    payload = torch.load(model, weights_only=True, mmap=True)
    params = evaluated_parameters(portable.build(payload["network"]))
    result = {"method": method, "checkpoint_mib": (run / "checkpoint.pt").stat().st_size / 2**20,
              "model_mib": model.stat().st_size / 2**20, "params": params, "fp32_mib": 4 * params / 2**20,
              "evaluate": {}, "identical": None}
    variants = (("before", run, before_src), ("after", run, None), ("after_model", model, None))

    def evaluate(variant: str, source: Path, src: Path | None) -> tuple[dict[str, float], list]:
        out = work / "eval" / f"{method}-{variant}"
        shutil.rmtree(out, ignore_errors=True)
        log = work / "logs" / f"{method}-evaluate-{variant}.log"
        m = measured(["evaluate", str(source), "--data", str(data), "--out", str(out), "--device", "cpu"], log, src)
        if m["rc"] != 0:
            raise SystemExit(f"evaluate ({variant}) of {method} failed, see {log}")
        print(f"{method:12s} {variant:11s} peak {m['peak_mib']:7.0f} MiB  {m['wall_s']:6.1f} s", flush=True)
        return m, json.loads((out / "summary.json").read_text())["cases"]

    # Each evaluation is its own process, so running them side by side leaves every peak unchanged.
    with ThreadPoolExecutor(jobs) as pool:
        done = dict(zip([v for v, _, _ in variants], pool.map(lambda v: evaluate(*v), variants), strict=True))
    result["evaluate"] = {v: m for v, (m, _) in done.items()}
    cases = {v: c for v, (_, c) in done.items()}
    result["identical"] = cases["before"] == cases["after"] == cases["after_model"]
    return result


def markdown(results: list[dict], command: str, n_cases: int) -> str:
    measured_names = {r["method"] for r in results}
    left = [m for m in METHODS if m not in measured_names]
    missing = f" Not in this table (not measured yet): {', '.join(left)}." if left else ""
    rows = []
    for r in results:
        ev = r["evaluate"]
        rows.append([r["method"], f"{r['checkpoint_mib']:.1f}", f"{r['model_mib']:.1f}", f"{r['params']:,d}",
                     f"{r['fp32_mib']:.1f}", f"{100 * (r['model_mib'] / r['fp32_mib'] - 1):+.1f} %",
                     f"{ev['before']['peak_mib']:.0f}", f"{ev['after']['peak_mib']:.0f}",
                     f"{ev['after_model']['peak_mib']:.0f}", "yes" if r["identical"] else "**no**"])
    table = markdown_table(["method", "checkpoint.pt MiB", "model.pt MiB", "evaluated params", "fp32 weights MiB",
                            "model.pt vs fp32", "evaluate peak MiB, before", "after (run folder)",
                            "after (model.pt)", "per-case metrics identical"], rows)
    return "\n".join([
        "### Lean artifacts: model file size and evaluation memory", "", stamp(), "", f"Command: `{command}`", "",
        f"Each run folder comes from a {results[0].get('iterations', 1)}-iteration training at the paper's sizes "
        "(la-8 recipe, patch 112x112x80, 16 filters); `semiseg evaluate` scores "
        f"{n_cases} LA test volumes on this CPU, each call in a fresh process whose peak resident set is read when it "
        "exits (MiB). Before: the code of the commit named in the command, which loads the whole checkpoint and "
        "builds the whole method; after: the inference network's tensors alone, read from the memory-mapped "
        "checkpoint, and at most 2 windows per forward pass on CPU; after (model.pt): the exported file. The runs "
        f"use a stride of {STRIDE.replace(',', 'x')} (12 windows per volume) to save time: the peak does not depend "
        "on the number of windows. CrossMatch is trained with a 1+2 batch (its checkpoint holds no batch-sized "
        "state). fp32 weights = 4 bytes x the evaluated network's parameters. Not measured: the official CAML test "
        "script on the same volumes (its peak beside these columns), and the peak of one training step beside the "
        "official step." + missing, "", table])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--la", type=Path, default=REPO.parent / "shared" / "data" / "LA")
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lean"))
    parser.add_argument("--before", required=True, help="commit whose evaluate is the 'before' column")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="evaluations of a method run side by side (the peaks "
                        "are per process; only the wall times change)")
    parser.add_argument("--update-md", action="store_true")
    args = parser.parse_args()
    for sub in ("logs", "eval", "runs"):
        (args.work / sub).mkdir(parents=True, exist_ok=True)
    data = subset(args.la, args.cases, args.work / f"la-{args.cases}")
    before_src = before_tree(args.before, args.work)
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for method in args.methods:
        if method in results:  # measured by an earlier call with this --work
            continue
        results[method] = {**run_method(method, data, args.work, before_src, args.iterations, args.jobs),
                           "iterations": args.iterations}
        results_file.write_text(json.dumps(results, indent=1))
    ordered = [results[m] for m in METHODS if m in results]
    (REPO / "benchmarks" / "results" / "lean-artifacts.json").write_text(json.dumps(ordered, indent=1))
    command = "python benchmarks/lean_artifacts.py " + " ".join(sys.argv[1:])
    if args.update_md:
        update_section("lean-artifacts", markdown(ordered, command, args.cases))


if __name__ == "__main__":
    main()
