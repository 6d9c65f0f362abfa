"""Every shell command shown in README.md and docs/ runs, so the documentation cannot drift from the CLI.

The fenced `bash` blocks of each page are extracted and run in order, in a sandbox that holds tiny stand-ins for
what the pages assume: `../shared/data/LA` and `../shared/data/ACDC` (tiny synthetic datasets in those layouts),
`MyData` (a tiny NIfTI dataset in the nnU-Net layout), and the user's own files (`new_scan.nii.gz`,
`my_predictions/`, ...). `semiseg train` gets tiny settings appended (2 iterations, 4 filters, small patches on
the benchmark layouts); everything else runs exactly as written. A command that cannot run here is replaced by
the check named in `SUBSTITUTIONS`, with its reason; a command no rule covers fails the test.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from nifti_helpers import make_dataset

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
TINY_LA = "synthetic:n_train=18,n_test=2,shape=40x40x32"  # 18: the la-16 presets
TINY_COMMON = ["--iterations", "2", "--set", "n_filters=4", "--set", "num_workers=0"]
TINY_PATCH = {"3d": ["--set", "patch_size=32,32,16", "--set", "stride=16,16,8"], "2d": ["--set", "patch_size=32,32"],
              "own": []}  # own data: the window follows its image sizes (16x16x16 here)


@dataclass
class Command:
    page: str
    line: int
    text: str

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def shell_commands(page: Path) -> list[Command]:
    """The commands of the page's ```bash blocks: continuation lines joined, comments dropped."""
    text = page.read_text()
    commands = []
    for block in re.finditer(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
        first = text[: block.start()].count("\n") + 2
        pending, start = "", first
        for offset, line in enumerate(block.group(1).splitlines()):
            if not pending:
                start = first + offset
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            if shlex.split(pending, comments=True):
                commands.append(Command(page.name, start, pending))
            pending = ""
    return commands


# ---- the sandbox ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Datasets and user files the pages assume, built once; each page copies them into its own sandbox."""
    from semiseg.data import open_dataset
    from semiseg.data.layouts.acdc import write_synthetic_acdc
    from semiseg.data.prepare import prepare

    base = tmp_path_factory.mktemp("docs")
    la = open_dataset(TINY_LA)
    shutil.copytree(la.root, base / "shared" / "data" / "LA")
    shutil.copytree(la.root, base / "files" / "data" / "LA")  # where `semiseg data download la` puts it
    write_synthetic_acdc(base / "shared" / "data" / "ACDC", patients=8, shape=(3, 32, 28))  # 8: acdc-7
    files = base / "files"
    own = make_dataset(files / "MyData", n_labeled=10, n_unlabeled=1, n_test=2)
    prepare(own)
    scans = files / "more_scans"
    scans.mkdir()
    shutil.copy(own / "imagesTs" / "toy_011_0000.nii.gz", files / "new_scan.nii.gz")
    shutil.copy(own / "imagesTs" / "toy_012_0000.nii.gz", scans / "other.nii.gz")
    shutil.copytree(own / "imagesTs", files / "new_scans")
    for c in (0, 1):
        shutil.copy(own / "imagesTs" / f"toy_011_{c:04d}.nii.gz", files / f"scan_{c:04d}.nii.gz")
    predictions = files / "my_predictions"
    predictions.mkdir()
    for case_id in la.test_ids:  # a user's label maps of the LA test cases, one voxel layer off
        with h5py.File(predictions / f"{case_id}.h5", "w") as f:
            f.create_dataset("label", data=np.roll(la.read_eval(case_id).label, 1, axis=0))
    return base


def _sandbox(stand_ins: Path, page: str) -> Path:
    cwd = stand_ins / f"cwd-{page}"
    shutil.copytree(stand_ins / "files", cwd)
    # commands the pages run from the repository root use its committed fixtures (an official CAML checkpoint)
    shutil.copytree(REPO / "tests" / "golden" / "official", cwd / "tests" / "golden" / "official")
    shutil.copy(REPO / "tests" / "official_fixture.py", cwd / "tests" / "official_fixture.py")
    return cwd


# ---- how each command runs -----------------------------------------------------------------------------------------

def _data_kind(argv: list[str]) -> str:
    data = argv[argv.index("--data") + 1] if "--data" in argv else "synthetic"
    if "ACDC" in data:
        return "2d"
    return "own" if "MyData" in data else "3d"


def tiny(argv: list[str]) -> list[str]:
    """`semiseg train` at test size: the documented options, then tiny settings (later --set values win). A resume
    runs as written, except that an extension's `--iterations` goes to 4 (the tiny run stopped at 2)."""
    if "--resume" in argv:
        return [("4" if i and argv[i - 1] == "--iterations" else a) for i, a in enumerate(argv)]
    argv = [TINY_LA if a == "synthetic" else a for a in argv]
    return [*argv, *TINY_COMMON, *TINY_PATCH[_data_kind(argv)]]


def run_semiseg(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """The console entry point in this process, from the sandbox; returns what it printed."""
    from semiseg.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["semiseg", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    assert (info.value.code or 0) == 0, f"semiseg {shlex.join(argv)} failed:\n{err}"
    return out + err


def _options_exist(argv: list[str], help_text: str) -> None:
    flat = " ".join(help_text.replace("│", " ").split())
    missing = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in flat]
    assert not missing, f"{shlex.join(argv)}: options not in its --help: {missing}"


def check_benchmark(argv: list[str], cwd: Path, *_: object) -> str:
    """A benchmark takes minutes to hours: its documented arguments are parsed (`... --help`) and every option
    must be one the script declares."""
    result = subprocess.run([sys.executable, str(REPO / argv[1]), *argv[2:], "--help"], capture_output=True, text=True,
                            timeout=120, cwd=cwd)
    assert result.returncode == 0, result.stderr
    _options_exist(argv[2:], result.stdout)
    return result.stdout


def check_make(argv: list[str], *_: object) -> str:
    """`make demo` / `make test` build a venv from the network; their recipes must run what the suite tests:
    `semiseg demo` (tests/test_cli.py::test_demo_trains_and_evaluates_on_the_embedded_synthetic_data) and pytest."""
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(rf"^{argv[1]}:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, f"Makefile has no target {argv[1]!r}"
    assert ("semiseg demo" if argv[1] == "demo" else "pytest") in recipe.group(1) or argv[1] == "test" and \
        "lint" in recipe.group(0)
    return recipe.group(0)


def run_torchrun(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """Several GPUs are not here: the same `semiseg.cli train` arguments run in one process (multi-process training
    itself is tested with 2 gloo processes in tests/test_distributed.py)."""
    cli_args = argv[argv.index("semiseg.cli") + 1:]
    return run_semiseg(tiny(cli_args), cwd, monkeypatch, capsys)


def run_download(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """The LA download is 233 MB from GitHub (tests/test_download.py checks it against a local server): the options
    are checked, and the tiny LA stand-in is put where the command would write, for the commands after it."""
    help_text = run_semiseg([*argv[1:3], "--help"], cwd, monkeypatch, capsys)
    _options_exist(argv[3:], help_text)
    target = cwd / argv[argv.index("--out") + 1]
    shutil.copytree(cwd.parent / "shared" / "data" / "LA", target, dirs_exist_ok=True)
    return help_text


def run_convert(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """Raw ACDC / Pancreas-CT / BraTS need registration with their providers (tests/test_convert.py converts
    generated raw files): the dataset name and options are checked against `data convert --help`."""
    from semiseg.data.convert import DATASETS

    assert argv[3] in DATASETS, f"unknown dataset {argv[3]!r} in {shlex.join(argv)}"
    help_text = run_semiseg(["data", "convert", "--help"], cwd, monkeypatch, capsys)
    _options_exist(argv[4:], help_text)
    return help_text


def run_fixture_script(argv: list[str], cwd: Path, *_: object) -> str:
    """Not a substitution: the repository's fixture script runs as written, in the sandbox's copy of `tests/`."""
    result = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


Runner = Callable[[list[str], Path, pytest.MonkeyPatch, pytest.CaptureFixture], str]
# (how a command starts, what runs instead, why): the reasons are in each runner's docstring.
SUBSTITUTIONS: list[tuple[tuple[str, ...], Runner]] = [
    (("make",), check_make),
    (("torchrun",), run_torchrun),
    (("python", "benchmarks/"), check_benchmark),
    (("python", "tests/official_fixture.py"), run_fixture_script),
    (("semiseg", "data", "download"), run_download),
    (("semiseg", "data", "convert"), run_convert),
]


def runner_for(argv: list[str]) -> Runner | None:
    for prefix, runner in SUBSTITUTIONS:
        if all(a.startswith(p) for a, p in zip(argv, prefix, strict=False)) and len(argv) >= len(prefix):
            return runner
    if argv[0] == "semiseg":
        return lambda a, cwd, mp, cap: run_semiseg(tiny(a[1:]) if a[1] == "train" else a[1:], cwd, mp, cap)
    return None


# ---- the tests -----------------------------------------------------------------------------------------------------

def test_every_documented_command_has_a_rule() -> None:
    commands = [c for page in PAGES for c in shell_commands(page)]
    assert len(commands) > 25  # the extraction finds the pages' blocks
    unruled = [f"{c.page}:{c.line}: {c.text}" for c in commands if runner_for(c.argv) is None]
    assert not unruled, "documented commands no rule runs:\n" + "\n".join(unruled)
    for _, runner in SUBSTITUTIONS:
        assert runner.__doc__, f"{runner.__name__} must say why it replaces the command"


@pytest.mark.parametrize("page", [p for p in PAGES if shell_commands(p)], ids=lambda p: str(p.relative_to(REPO)))
def test_documented_commands_run(page: Path, stand_ins: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    cwd = _sandbox(stand_ins, page.name)
    for command in shell_commands(page):
        runner = runner_for(command.argv)
        assert runner is not None, command
        try:
            runner(command.argv, cwd, monkeypatch, capsys)
        except AssertionError as exc:
            raise AssertionError(f"{command.page}:{command.line}: {command.text}\n{exc}") from None
