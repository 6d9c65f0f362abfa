"""Lean artifacts: the exported model file of every method against its evaluated network's fp32 weights, and the
peak resident memory of `semiseg evaluate` on LA test volumes, before and after lean loading.

    python benchmarks/lean_artifacts.py --la ../shared/data/LA --cases 2 --work /tmp/lean --before a5b5541 --update-md

1. A dataset folder with the LA training list and the first `--cases` test volumes (symlinks into `--la`).
2. One run folder per method (`--methods`), trained for `--iterations` iterations at the paper's sizes (la-8 recipe,
   112x112x80 patch, 16 filters) with the `--before` code (which both codes can read; with this checkout for a
   method that code does not have, which then gets no before column), unless already there: the
   sizes, not the training, decide the memory (CAML's memory bank is allocated at its first step). The runs use a
   stride of 56x56x40 so that each volume needs 12 windows instead of the protocol's 45-54; the peak memory does
   not depend on the number of windows.
3. `semiseg export` of each run; then `semiseg evaluate` of the run folder with the code of `--before` (a commit,
   extracted with `git archive`) and with this checkout, and of the exported file, each in its own process, whose
   peak resident set (`ru_maxrss`) is read when it exits. The per-case metrics of the three must be identical.

4. With `--official-caml CHECKOUT` (Herschel555/CAML), `--official-mcnet CHECKOUT` (ycwu1997/MC-Net, for the
   mcnet and mcnet_plus runs), `--official-ssnet CHECKOUT` (ycwu1997/SS-Net) and `--official-bcp CHECKOUT`
   (DeepMed-Lab-ECNU/BCP): the official test script (`code/test_3d.py`; SS-Net's and BCP's `code/test_LA.py`) on
   the same volumes, with the run's
   weights in the official key layout and the run's stride instead of its hard-coded one (`official_test.py` says
   how it runs in place), in its own process beside `semiseg evaluate` of the run folder (for CAML also with the
   other window batch on CPU, 1 or 2 windows per forward pass, for what a window costs); its peak resident set, and
   its per-case medpy Dice / Jaccard / HD95 / ASD against semiseg's. Needs medpy, nibabel, scikit-image, h5py and
   tqdm (which semiseg does not); skipped when the checkout is absent.

    python benchmarks/lean_artifacts.py --cases 2 --before a5b5541 --official-caml /tmp/official/CAML --update-md

Methods already measured in `--work` (its results.json) are skipped, and so is an official run once its
official-METHOD.json is there, so an interrupted call continues. `--merge` re-measures only `--methods` and keeps
the committed rows and official comparisons of the others (the table says which code's window batch each row ran
with):

    python benchmarks/lean_artifacts.py --cases 2 --before a5b5541 --methods mcnet mcnet_plus --merge \
        --official-mcnet /tmp/official/MC-Net --update-md
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, markdown_table, stamp, update_section

METHODS = ["supervised", "mean_teacher", "uamt", "mcnet", "mcnet_plus", "bcp", "mlrpl", "crossmatch", "caml",
           "dtc", "urpc", "cps", "admt", "ssnet", "unimatch"]
STRIDE = "56,56,40"
# CrossMatch's la-8 step (batch 2+4) needs about 12 GB, UniMatch's (the same batch, as CrossMatch runs it) as much;
# their checkpoints hold no batch-sized state, so a 1+2 batch gives the same run folder sizes.
SMALL_BATCH = ["--set", "batch_labeled=1", "--set", "batch_unlabeled=2"]
TRAIN_EXTRA = {"crossmatch": SMALL_BATCH, "unimatch": SMALL_BATCH}
CASES_DIR = "2018LA_Seg_Training Set"
RUNNER = (str(REPO / "benchmarks" / "official_test.py"),)
# The methods with an official test script wired up (official_test.TESTS), the flag that gives its checkout, and
# the name the report uses.
OFFICIAL_FLAGS = {"caml": "--official-caml", "mcnet": "--official-mcnet", "mcnet_plus": "--official-mcnet",
                  "ssnet": "--official-ssnet", "bcp": "--official-bcp"}
NAMES = {"caml": "CAML", "mcnet": "MC-Net", "mcnet_plus": "MC-Net+", "ssnet": "SS-Net", "bcp": "BCP"}


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


@functools.cache
def methods_of(src: Path) -> frozenset[str]:
    """The methods the package source under `src` registers."""
    listing = subprocess.run([sys.executable, "-c", "from semiseg.methods import available_methods; "
                              "print(' '.join(available_methods()))"], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(src)})
    return frozenset(listing.stdout.split())


def training_code(method: str, before_src: Path) -> Path | None:
    """The code a method's run folder is trained with: the `--before` code when it has the method (so both codes
    can read the folder), else this checkout's (None): a method added after `--before` has no before column."""
    return before_src if method in methods_of(before_src) else None


def measured(args: list[str], log: Path, pythonpath: Path | None = None,
             program: tuple[str, ...] = ("-m", "semiseg.cli")) -> dict[str, float]:
    """Run `semiseg ARGS` (or `python PROGRAM ARGS`) in a fresh process; its peak resident set (MiB), wall time and
    exit status."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *program, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"peak_mib": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - t0,
            "rc": os.waitstatus_to_exitcode(status)}


def ensure_run(method: str, data: Path, work: Path, iterations: int, before_src: Path) -> Path:
    """The method's run folder in `work`, trained for `iterations` iterations at the paper's sizes if missing, with
    the `--before` code where it has the method, so that both the before and the after code can read it (a newer
    run folder may hold settings the older code does not know)."""
    run = work / "runs" / method
    if not (run / "checkpoint.pt").is_file():
        preset = [] if method == "supervised" else ["--preset", "la-8"]
        log = work / "logs" / f"{method}-train.log"
        train = measured(["train", "--method", method, *preset, "--data", str(data), "--iterations", str(iterations),
                          "--set", f"stride={STRIDE}", "--set", "num_workers=0", *TRAIN_EXTRA.get(method, []),
                          "--out", str(run), "--quiet"], log, training_code(method, before_src))
        if train["rc"] != 0:
            raise SystemExit(f"training {method} failed, see {log}")
    return run


def run_method(method: str, data: Path, work: Path, before_src: Path, iterations: int, jobs: int) -> dict:
    run = ensure_run(method, data, work, iterations, before_src)
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
              "evaluate": {}, "identical": None,
              "cpu_windows": paper_windows()}
    variants = ((("before", run, before_src),) if training_code(method, before_src) else ()) + (
        ("after", run, None), ("after_model", model, None))

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
    result["identical"] = cases.get("before", cases["after"]) == cases["after"] == cases["after_model"]
    return result


METRICS = ("dice", "jaccard", "hd95", "asd")
RTOL = 1e-9  # medpy's and semiseg's surface distances are the same EDT sums, up to summation order


def compare_cases(official: dict[str, list[float]], ours: dict[str, list[float]],
                  rtol: float = RTOL) -> dict[str, object]:
    """Per-metric largest absolute difference between the official script's and semiseg's per-case
    (Dice, Jaccard, HD95, ASD), and whether every value agrees to `rtol` (relative, absolute below 1)."""
    if sorted(official) != sorted(ours):
        return {"identical": False, "why": f"cases differ: {sorted(official)} vs {sorted(ours)}"}
    worst = {m: 0.0 for m in METRICS}
    agree = True
    for case, values in official.items():
        for name, a, b in zip(METRICS, values, ours[case], strict=True):
            worst[name] = max(worst[name], abs(a - b))
            agree &= abs(a - b) <= rtol * max(1.0, abs(a))
    return {"identical": agree, "max_abs_diff": worst}


def official_test(method: str, checkout: Path, data: Path, work: Path, iterations: int, jobs: int,
                  before_src: Path) -> dict | None:
    """The method's official test script and `semiseg evaluate` on the same volumes, weights and windows, each in
    its own process (peak resident set of each); None when `checkout` has no official test script."""
    from official_test import TESTS, official_available

    from semiseg.official import official_layout

    repo = official_layout(method, 3).repo
    flag = OFFICIAL_FLAGS[method]
    if not official_available(checkout, method):
        print(f"{flag} {checkout}: no official test script {TESTS[method].script} there ({repo}); the official "
              f"column of {method} is skipped", flush=True)
        return None
    run = ensure_run(method, data, work, iterations, before_src)
    scratch = work / f"official-{method}"
    shutil.rmtree(scratch, ignore_errors=True)
    export = measured(["export", method, str(run), str(checkout), str(data), str(scratch)], work / "logs" /
                      f"{method}-official-export.log", program=RUNNER)
    if export["rc"] != 0:
        raise SystemExit(f"export to the official layout failed, see {work / 'logs' / f'{method}-official-export.log'}")
    xy, y, z = (int(v) for v in STRIDE.split(","))
    if xy != y:
        raise SystemExit(f"stride {STRIDE}: the official script has one stride for x and y")
    out = work / "eval" / f"{method}-beside-official"
    shutil.rmtree(out, ignore_errors=True)
    calls = {"official": (["test", str(checkout), str(scratch), str(xy), str(z)], RUNNER),
             "semiseg": (["evaluate", str(run), "--data", str(data), "--out", str(out), "--device", "cpu",
                          *TESTS[method].semiseg_args],
                         ("-m", "semiseg.cli"))}

    def call(side: str) -> dict[str, float]:
        args, program = calls[side]
        log = work / "logs" / f"{method}-{side}-test.log"
        m = measured(args, log, program=program)
        if m["rc"] != 0:
            raise SystemExit(f"{side} evaluation of the {method} run failed, see {log}")
        print(f"{method:12s} {side:11s} peak {m['peak_mib']:7.0f} MiB  {m['wall_s']:6.1f} s", flush=True)
        return m

    with ThreadPoolExecutor(min(jobs, 2)) as pool:  # separate processes: side by side leaves each peak unchanged
        peaks = dict(zip(calls, pool.map(call, calls), strict=True))
    official = json.loads((work / "logs" / f"{method}-official-test.log").read_text().splitlines()[-1])
    ours = {c["case"]: [c[m] for m in METRICS] for c in json.loads((out / "summary.json").read_text())["cases"]}
    return {"method": method, "repo": repo, "script": TESTS[method].script,
            "patch_module": TESTS[method].patch_module, "official": peaks["official"],
            "semiseg": peaks["semiseg"], "official_cases": official["cases"], "official_empty": official["empty"],
            "semiseg_cases": ours, "strides_asked": official["strides_asked"],
            "strides_used": official["strides_used"], "rtol": RTOL,
            "comparison": compare_cases(official["cases"], ours)}


def other_windows(official: dict, data: Path, work: Path) -> dict:
    """`semiseg evaluate` of the CAML run with the other window batch on CPU (2 windows per forward pass when the
    default at the paper's size is 1, else 1), in its own process: its peak, and whether its per-case metrics are
    those of the default. What one more window's activations cost, or save."""
    windows = 2 if paper_windows() == 1 else 1
    out = work / "eval" / f"caml-{windows}-windows"
    shutil.rmtree(out, ignore_errors=True)
    log = work / "logs" / f"caml-semiseg-{windows}-windows.log"
    m = measured(["semiseg", str(windows), "evaluate", str(work / "runs" / "caml"), "--data", str(data), "--out",
                  str(out), "--device", "cpu"], log, program=RUNNER)
    if m["rc"] != 0:
        raise SystemExit(f"semiseg evaluate with {windows} windows per forward pass failed, see {log}")
    print(f"caml         {windows} windows   peak {m['peak_mib']:7.0f} MiB  {m['wall_s']:6.1f} s", flush=True)
    ours = {c["case"]: [c[k] for k in METRICS] for c in json.loads((out / "summary.json").read_text())["cases"]}
    return {**m, "windows": windows, "identical": ours == official["semiseg_cases"]}


def paper_windows() -> int:
    """Windows per forward pass of `semiseg evaluate` on CPU at the paper's window size (this code's default)."""
    from semiseg.engine.model_file import PAPER_WINDOW_VOXELS, cpu_windows_per_pass

    return cpu_windows_per_pass((PAPER_WINDOW_VOXELS,))


def windows_label(n: int) -> str:
    return f"{n} window{'s' if n > 1 else ''} per forward pass"


def official_markdown(official: dict, table_peaks: dict[str, float]) -> str:
    """The side-by-side table of the official test script and semiseg evaluate, and the verdict on the target
    (`table_peaks`: semiseg's peaks of the method in the main table, e.g. run folder and model file)."""
    method = official.get("method", "caml")  # measurements before MC-Net's script was wired up: CAML's
    name, repo = NAMES[method], official.get("repo", "Herschel555/CAML")
    peak_o, peak_s = official["official"]["peak_mib"], official["semiseg"]["peak_mib"]
    comparison = official["comparison"]
    asked, used = official["strides_asked"], official["strides_used"]
    default = official.get("default_windows", 2)  # measurements before `CPU_WINDOWS` was recorded: 2
    script = official.get("script", "code/test_3d.py")  # measurements before SS-Net's script: test_3d.py
    utility = official.get("patch_module", "utils.test_patch").replace(".", "/") + ".py"
    rows = [[f"official `{script}`", f"{peak_o:.0f}", f"{official['official']['wall_s']:.0f}"],
            [f"semiseg evaluate (run folder, default: {windows_label(default)})", f"{peak_s:.0f}",
             f"{official['semiseg']['wall_s']:.0f}"]]
    other = official.get("other_windows")
    if other:
        rows.append([f"semiseg evaluate, {windows_label(other['windows'])}", f"{other['peak_mib']:.0f}",
                     f"{other['wall_s']:.0f}"])
    cases = []
    for case, values in official["official_cases"].items():
        ours = official["semiseg_cases"][case]
        cases.append([case, *(f"{a:.6f} / {b:.6f}" for a, b in zip(values, ours, strict=True))])
    worst = comparison.get("max_abs_diff", {})
    peaks = {"beside it": peak_s, **{f"{k}, table above": v for k, v in table_peaks.items()}}
    listed = ", ".join(f"{v:.0f} MiB ({k}, {v - peak_o:+.0f})" for k, v in peaks.items())
    if not comparison["identical"]:
        verdict = "**Target not met**: the per-case metrics differ"
    elif all(v <= peak_o for v in peaks.values()):
        verdict = (f"**Target met** at the default ({windows_label(default)}): semiseg's evaluation peaks {listed} "
                   f"are at most the official {peak_o:.0f} MiB, with identical metrics")
    else:
        verdict = (f"**Target not met** at the default ({windows_label(default)}): semiseg's evaluation peaks "
                   f"{listed} against the official {peak_o:.0f} MiB; the metrics are identical")
    if other and comparison["identical"]:
        met = other["peak_mib"] <= peak_o and other["identical"]
        verdict += (f". With {windows_label(other['windows'])}: {other['peak_mib']:.0f} MiB "
                    f"({other['peak_mib'] - peak_o:+.0f}), per-case metrics "
                    + ("identical: within the target" if met else "identical, above the official peak"
                       if other["identical"] else "**differ**"))
    loading = ("the run folder's network exported to the official keys with `semiseg.official.to_official_state` "
               "and loaded strictly into the official test network")
    if method in ("ssnet", "bcp"):
        loading = ("the run's network exported to the official keys with `semiseg.official.to_official_state` and "
                   "loaded strictly into the official VNet, as the script itself loads it (the official "
                   "training-only heads semiseg does not build keep their initial values); without the largest-"
                   "component filter on either side (`--nms 0`, `semiseg evaluate --no-lcc`: the script's default "
                   "`--nms 1` asserts on an empty prediction, which a 1-iteration run makes)")
    elif method != "caml":
        loading = ("the run's network exported to the official keys with `semiseg.official.to_official_state`, "
                   "loaded strictly into the official network it was trained as, and read by the script, as it "
                   "does, into its one-decoder VNet with `strict=False` (every key of that VNet is in the file: "
                   "encoder and decoder 1, the output semiseg evaluates too)")
    return "\n".join([
        "", f"#### {name}: the official test script beside `semiseg evaluate`", "",
        *([official["stamp"], ""] if official.get("stamp") else []),
        f"The official test script of {repo} (`{script}` with `{utility}`) runs "
        f"unmodified from its checkout, in its own process, on the same volumes with the same weights ({loading}) "
        "and the same windows: its hard-coded stride "
        f"{asked.get('stride_xy')}/{asked.get('stride_z')} (xy/z) is replaced at call time by the run's "
        f"{used['stride_xy']}/{used['stride_z']} (`benchmarks/official_test.py`: `.cuda()` is the identity, "
        "NumPy's `np.int` alias restored; the script also writes its NIfTI outputs, as it does by default). "
        "`semiseg evaluate` of the run folder runs beside it, both in fresh processes (peak resident set, MiB). "
        f"Per-case metrics (official medpy / semiseg, full precision): identical to {official['rtol']:g} relative: "
        f"{'yes' if comparison['identical'] else '**no**'}; largest absolute differences "
        + ", ".join(f"{m} {worst.get(m, float('nan')):.1e}" for m in METRICS)
        + (f"; empty official predictions: {', '.join(official['official_empty'])}"
           if official["official_empty"] else "") + ".", "",
        markdown_table(["evaluation", "peak MiB", "wall s (loaded machine)"], rows), "",
        markdown_table(["case", "Dice", "Jaccard", "HD95", "ASD"], cases), "",
        f"Against the target (evaluation peak no larger than the official test script's on the same volumes, "
        f"identical metrics): {verdict}."])


def markdown(results: list[dict], command: str, n_cases: int, officials: dict[str, dict] | None = None) -> str:
    officials = officials or {}
    measured_names = {r["method"] for r in results}
    left = [m for m in METHODS if m not in measured_names]
    missing = f" Not in this table (not measured yet): {', '.join(left)}." if left else ""
    rows = []
    for r in results:
        ev = r["evaluate"]
        official = officials.get(r["method"])
        rows.append([r["method"], f"{r['checkpoint_mib']:.1f}", f"{r['model_mib']:.1f}", f"{r['params']:,d}",
                     f"{r['fp32_mib']:.1f}", f"{100 * (r['model_mib'] / r['fp32_mib'] - 1):+.1f} %",
                     f"{ev['before']['peak_mib']:.0f}" if "before" in ev else "- (newer method)",
                     f"{ev['after']['peak_mib']:.0f}",
                     f"{ev['after_model']['peak_mib']:.0f}", str(r.get("cpu_windows", 2)),
                     f"{official['official']['peak_mib']:.0f}" if official else "-",
                     "yes" if r["identical"] else "**no**"])
    table = markdown_table(["method", "checkpoint.pt MiB", "model.pt MiB", "evaluated params", "fp32 weights MiB",
                            "model.pt vs fp32", "evaluate peak MiB, before", "after (run folder)",
                            "after (model.pt)", "CPU windows per pass (after)", "official test script peak MiB",
                            "per-case metrics identical"], rows)
    by_method = {r["method"]: r for r in results}
    parts = []
    for method, official in officials.items():
        row = by_method.get(method)
        table_peaks = {"run folder": row["evaluate"]["after"]["peak_mib"],
                       "model.pt": row["evaluate"]["after_model"]["peak_mib"]} if row else {}
        parts.append(official_markdown(official, table_peaks))
    run = [NAMES[m] for m in officials]
    not_run = [m for m in measured_names if m not in officials]
    scripts = (f"the official test scripts of {', '.join(run)} on the same volumes and weights (below)" if run
               else "no official test script was run (no `--official-caml` / `--official-mcnet` / `--official-ssnet` / "
                     "`--official-bcp` checkout)")
    return "\n".join([
        "### Lean artifacts: model file size and evaluation memory", "", stamp(), "", f"Command: `{command}`", "",
        f"Each run folder comes from a {results[0].get('iterations', 1)}-iteration training at the paper's sizes "
        "(la-8 recipe, patch 112x112x80, 16 filters); `semiseg evaluate` scores "
        f"{n_cases} LA test volumes on this CPU, each call in a fresh process whose peak resident set is read when it "
        "exits (MiB). Before: the code of the commit named in the command, which loads the whole checkpoint and "
        "builds the whole method (none for a method added after that commit: its run is trained with this "
        "checkout); after: the inference network's tensors alone, read from the memory-mapped "
        "checkpoint, with at most the windows per forward pass on CPU of its column (those of the code that measured "
        "the row: 2 before 2026-12-03, 1 since); after (model.pt): the exported file. The runs "
        f"use a stride of {STRIDE.replace(',', 'x')} (12 windows per volume) to save time: the peak does not depend "
        "on the number of windows. CrossMatch and UniMatch are trained with a 1+2 batch (their checkpoints hold no "
        "batch-sized state). fp32 weights = 4 bytes x the evaluated network's parameters. The official column: "
        + scripts + (f"; for {', '.join(sorted(not_run))} no official test script was run" if not_run and run else "")
        + ". One training step's peak beside the official step: section vs-official-memory." + missing, "", table,
        *parts])


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
    parser.add_argument("--official-caml", type=Path, default=None,
                        help="checkout of Herschel555/CAML: run its test script beside semiseg evaluate (skipped "
                        "when the folder has no code/test_3d.py)")
    parser.add_argument("--official-mcnet", type=Path, default=None,
                        help="checkout of ycwu1997/MC-Net: run its test script beside semiseg evaluate of the mcnet "
                        "and mcnet_plus runs (skipped when the folder has no code/test_3d.py)")
    parser.add_argument("--official-ssnet", type=Path, default=None,
                        help="checkout of ycwu1997/SS-Net: run its test script beside semiseg evaluate of the ssnet "
                        "run (skipped when the folder has no code/test_LA.py)")
    parser.add_argument("--official-bcp", type=Path, default=None,
                        help="checkout of DeepMed-Lab-ECNU/BCP: run its test script beside semiseg evaluate of the "
                        "bcp run (skipped when the folder has no code/test_LA.py)")
    parser.add_argument("--merge", action="store_true", help="keep the committed rows (benchmarks/results/"
                        "lean-artifacts.json) of the methods not named in --methods; each row states its windows")
    parser.add_argument("--update-md", action="store_true")
    args = parser.parse_args()
    for sub in ("logs", "eval", "runs"):
        (args.work / sub).mkdir(parents=True, exist_ok=True)
    data = subset(args.la, args.cases, args.work / f"la-{args.cases}")
    before_src = before_tree(args.before, args.work)
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    committed = REPO / "benchmarks" / "results" / "lean-artifacts.json"
    if args.merge and committed.is_file():
        kept = {r["method"]: r for r in json.loads(committed.read_text()) if r["method"] not in args.methods}
        results = {**kept, **results}
    for method in args.methods:
        if method in results:  # measured by an earlier call with this --work
            continue
        results[method] = {**run_method(method, data, args.work, before_src, args.iterations, args.jobs),
                           "iterations": args.iterations}
        results_file.write_text(json.dumps(results, indent=1))
    officials = {}
    for method, checkout in (("caml", args.official_caml), ("mcnet", args.official_mcnet),
                             ("mcnet_plus", args.official_mcnet), ("ssnet", args.official_ssnet),
                             ("bcp", args.official_bcp)):
        measured_here = args.work / f"official-{method}.json"
        kept = REPO / "benchmarks" / "results" / f"lean-artifacts-official-{method}.json"
        if measured_here.is_file():  # measured by an earlier call with this --work
            officials[method] = json.loads(measured_here.read_text())
        elif checkout is not None and method in args.methods:
            official = official_test(method, checkout, data, args.work, args.iterations, args.jobs, before_src)
            if official is not None:
                officials[method] = {**official, "stamp": stamp()}
        elif args.merge and kept.is_file():
            officials[method] = json.loads(kept.read_text())
        if method in officials:
            official = officials[method]
            official.setdefault("default_windows", paper_windows())
            if method == "caml" and "other_windows" not in official:
                official["other_windows"] = other_windows(official, data, args.work)
            measured_here.write_text(json.dumps(official, indent=1))
    ordered = [results[m] for m in METHODS if m in results]
    (REPO / "benchmarks" / "results" / "lean-artifacts.json").write_text(json.dumps(ordered, indent=1))
    for method, official in officials.items():
        (REPO / "benchmarks" / "results" / f"lean-artifacts-official-{method}.json").write_text(
            json.dumps(official, indent=1))
    command = "python benchmarks/lean_artifacts.py " + " ".join(sys.argv[1:])
    if args.update_md:
        update_section("lean-artifacts", markdown(ordered, command, args.cases, officials))


if __name__ == "__main__":
    main()
