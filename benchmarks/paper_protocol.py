"""The papers' LA protocol (8 and 16 labelled cases, full recipe, last checkpoint) for every method with a preset.

Each run is an ordinary resumable `semiseg train --preset la-N` run folder, so the script can be stopped and started
again (e.g. across several calls on a lent GPU) and continues where it stopped. Finished runs are evaluated on the 20
test cases with the protocol sliding window (112x112x80, stride 18/18/4) and reported beside the published numbers.

    python benchmarks/paper_protocol.py --methods caml mlrpl crossmatch --labeled 8 16 --data ../shared/data/LA

A GPU is expected (15,000 iterations); `--allow-cpu` runs anyway. Writes benchmarks/results/paper_protocol.json and
the `paper-protocol` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown_table, stamp, update_section  # noqa: E402

# Published LA numbers (Dice % / Jaccard % / HD95 vox / ASD vox) from ../shared/specs/protocol.md section 7 and the
# method specs; "unverified" rows are quoted there as secondary sources.
PUBLISHED = {
    ("caml", 8): "89.62 / 81.28 / 8.76 / 2.02", ("caml", 16): "90.78 / 83.19 / 6.11 / 1.68",
    ("mlrpl", 8): "89.86 / - / 6.91 / - (unverified)", ("mlrpl", 16): "91.02 / - / 5.78 / - (unverified)",
    ("crossmatch", 8): "91.33 / 84.11 / 5.29 / 1.53", ("crossmatch", 16): "91.61 / 84.57 / 5.36 / 1.57",
    ("bcp", 8): "89.62 / 81.31 / 6.81 / 1.76 (best-on-test, LCC)", ("bcp", 16): "91.26 / - / 5.76 / - (unverified)",
    ("mcnet_plus", 8): "88.96 / 80.25 / 7.93 / 1.86 (best-on-test)",
    ("mcnet_plus", 16): "91.07 / 83.67 / 5.84 / 1.67 (best-on-test)",
    ("mcnet", 8): "87.62 / 78.25 / 10.03 / 1.82 (unverified)", ("uamt", 8): "87.79 / 78.39 / 8.68 / 2.12 (unverified)",
    ("supervised", 8): "82.74 / 71.72 / 13.35 / 3.26 (unverified)",
    ("supervised", 80): "91.47 / 84.36 / 5.48 / 1.51 (unverified)",
}
RESULTS = REPO / "benchmarks" / "results" / "paper_protocol.json"


def run(method: str, labeled: int, data: str, work: Path) -> dict:
    """Train (or continue) and evaluate one run."""
    from semiseg.methods import get_method

    out = work / f"{method}-la{labeled}"
    preset = f"la-{labeled}"
    if (out / "checkpoint.pt").exists():
        cmd = ["train", "--out", str(out), "--resume", "--quiet"]
    else:
        extra = ["--preset", preset] if preset in get_method(method).presets else []
        cmd = ["train", "--method", method, *extra, "--data", data, "--labeled", str(labeled), "--out", str(out),
               "--quiet"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "semiseg.cli", *cmd], check=True)
    wall = time.perf_counter() - t0
    subprocess.run([sys.executable, "-m", "semiseg.cli", "evaluate", str(out), "--out", str(out / "eval-test")],
                   check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "eval-test" / "summary.json").read_text())
    train = json.loads((out / "train_summary.json").read_text())
    m = summary["metrics"]
    return {"method": method, "labeled": labeled, "preset": summary["protocol"].get("preset"),
            "checkpoint": summary["protocol"]["checkpoint"], **{k: m[k]["mean"] for k in ("dice", "jaccard", "hd95",
                                                                                          "asd")},
            "this_call_wall_s": wall, "total_wall_s": train["total_wall_s"],
            "train_s_per_it": train["s_per_it"], "device": train["device"],
            "published": PUBLISHED.get((method, labeled), "-"), "stamp": stamp()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["caml", "mlrpl", "crossmatch"])
    parser.add_argument("--labeled", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "LA"))
    parser.add_argument("--work", default=str(REPO / "runs" / "paper"))
    parser.add_argument("--allow-cpu", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("no GPU: the paper protocol is 15,000 iterations per run; pass --allow-cpu to run anyway")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for method in args.methods:
        for labeled in args.labeled:
            row = run(method, labeled, args.data, Path(args.work))
            results[f"{method}-{labeled}"] = row
            RESULTS.write_text(json.dumps(results, indent=1))
            print(json.dumps(row), flush=True)
    rows = [[r["method"], str(r["labeled"]), f"{100 * r['dice']:.2f} / {100 * r['jaccard']:.2f} / {r['hd95']:.2f} / "
             f"{r['asd']:.2f}", r["published"], f"{r['checkpoint']['iteration']}/{r['checkpoint']['of']} "
             f"({r['checkpoint']['rule']})", f"{r['train_s_per_it']:.3f}", f"{r.get('total_wall_s', 0) / 60:.1f}",
             r["device"], r["stamp"]]
            for r in results.values()]
    table = markdown_table(["method", "labelled", "ours: Dice / Jac / HD95 / ASD", "published", "checkpoint",
                            "s/it", "training wall min (all calls)", "device", "run stamp"], rows)
    update_section("paper-protocol", "Command: `python benchmarks/paper_protocol.py --methods ... --labeled 8 16`\n\n"
                   + table + "\n")


if __name__ == "__main__":
    main()
