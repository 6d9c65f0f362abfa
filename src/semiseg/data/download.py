"""Download the preprocessed LA files, verified, resumable, and never half-written where a good file goes.

Each file is fetched into `<name>.part` (resumed with an HTTP Range request after an interruption),
its SHA-256 is checked against the shipped `SHA256SUMS`, and only then is it fsynced and renamed into
place. A file already present with the right checksum is kept; one with a wrong checksum is removed
and fetched again. The default source is the UA-MT repository, which hosts the distributed files.

A hostile or broken server cannot fill the disk or hang the command: each file is capped at its size in
the shipped `SIZES` (at `MAX_FILE_BYTES` when unknown) and must arrive within an overall deadline; either
failure removes the partial file. A `.part` that is a symbolic link is never followed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from importlib import resources
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import quote
from urllib.request import Request, urlopen

from .. import __version__
from ..errors import DataError
from .layouts.la import CASES_DIR

LA_URL = "https://raw.githubusercontent.com/yulequan/UA-MT/master/data/2018LA_Seg_Training%20Set"
CHUNK = 1 << 20
MAX_FILE_BYTES = 1 << 30  # cap for a file whose size the SIZES file does not give
DEADLINE_S = 900.0  # per file, over all its attempts


class DownloadError(DataError):
    """A file could not be fetched or did not match its checksum."""


class _Fatal(Exception):
    """A transfer failure that retrying cannot fix (too much data, deadline passed); the part is removed."""


def check_entry_name(name: str, where: str) -> str:
    """A sums entry names a file below the dataset folder: relative, without `..`."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        raise DataError(f"{where}: path {name!r} would lead outside the dataset folder; entries must be relative "
                        "paths without '..'")
    return name


def la_resource(name: str) -> Path:
    """A file shipped with semiseg: LA's SHA256SUMS, train.list or test.list."""
    return Path(str(resources.files("semiseg.data").joinpath(f"resources/la/{name}")))


def read_sums(path: Path) -> list[tuple[str, str]]:
    """(sha256, relative path) pairs of a `sha256sum` file."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise DataError(f"{path}:{number}: expected '<sha256>  <path>', got {line!r}")
        entries.append((digest.lower(), check_entry_name(name.strip().lstrip("*"), f"{path}:{number}")))
    return entries


def read_sizes(path: Path) -> dict[str, int]:
    """Relative path -> size in bytes, from lines `<bytes>  <path>` (the shipped `SIZES`)."""
    sizes = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        size, _, name = line.partition("  ")
        if not size.isdigit() or not name.strip():
            raise DataError(f"{path}:{number}: expected '<bytes>  <path>', got {line!r}")
        sizes[name.strip()] = int(size)
    return sizes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _transfer(url: str, part: Path, timeout: float, limit: int, deadline: float) -> None:
    """Append the rest of `url` to `part` (Range from its current size); raise if the body is cut short.

    `limit` caps the part's total size and `deadline` (a `time.monotonic` instant) its arrival: either is a
    `_Fatal` error. Reads return as soon as any data arrives, so a server trickling bytes still meets the
    deadline check.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"semiseg/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=min(timeout, max(deadline - time.monotonic(), 1)))
    except HTTPError as exc:
        if exc.code == 416 and offset:  # the part already holds the whole file
            return
        raise
    with response:
        resumed = offset and response.status == 206
        if resumed and not str(response.headers.get("Content-Range", "")).startswith(f"bytes {offset}-"):
            raise ConnectionError(f"server answered the range request with {response.headers['Content-Range']!r}")
        expected = response.headers.get("Content-Length")
        start = offset if resumed else 0
        received = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if resumed else os.O_TRUNC)
        with os.fdopen(os.open(part, flags, 0o644), "wb") as f:
            while block := response.read1(CHUNK):
                received += len(block)
                if start + received > limit:
                    raise _Fatal(f"the server sent more than the expected {limit} bytes")
                f.write(block)
                if time.monotonic() > deadline:
                    raise _Fatal(f"not complete within the deadline ({start + received} bytes received)")
            f.flush()
            os.fsync(f.fileno())
    if expected is not None and received < int(expected):
        raise ConnectionError(f"transfer interrupted after {received} of {expected} bytes")


def fetch(url: str, dest: Path, sha256: str, attempts: int = 3, timeout: float = 60.0, size: int | None = None,
          deadline_s: float = DEADLINE_S) -> bool:
    """Make `dest` a verified copy of `url`; returns False when a good copy was already there.

    `size` (bytes, when known) caps the transfer; the whole fetch, every attempt included, must finish
    within `deadline_s` seconds.
    """
    if dest.is_file():
        if sha256_file(dest) == sha256:
            return False
        dest.unlink()  # a wrong file is worse than none
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.is_symlink():
        raise DownloadError(f"{part}: the partial download is a symbolic link; semiseg does not follow it (it "
                            "would write where the link points); remove the link and run the command again")
    limit = size if size is not None else MAX_FILE_BYTES
    if part.exists() and part.stat().st_size > limit:
        part.unlink()  # longer than the file can be: not a prefix of it
    deadline = time.monotonic() + deadline_s
    problem = ""
    for _ in range(attempts):
        fresh = not part.exists()
        try:
            _transfer(url, part, timeout, limit, deadline)
        except _Fatal as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{dest}: download from {url} stopped: {exc}; the partial file was removed; check "
                                "--base-url or try again later") from None
        except (OSError, HTTPException, ValueError) as exc:  # OSError: URL, connection and timeout errors
            problem = str(getattr(exc, "reason", exc))
            if isinstance(exc, ValueError) or (isinstance(exc, HTTPError) and exc.code == 404):
                break
            if time.monotonic() > deadline:
                part.unlink(missing_ok=True)
                raise DownloadError(f"{dest}: download from {url} not complete within {deadline_s:.0f} s "
                                    f"({problem}); the partial file was removed; try again later") from None
            continue  # keep the part: the next attempt resumes it
        digest = sha256_file(part)
        if digest == sha256:
            os.replace(part, dest)
            return True
        part.unlink()
        problem = f"SHA-256 {digest} does not match the expected {sha256}"
        if fresh:  # a complete fresh copy is wrong: the source is bad, retrying will not help
            break
    raise DownloadError(f"{dest}: download from {url} failed ({problem}); nothing was left in its place, "
                        "run the command again (it resumes) or check --base-url")


def _copy_in(source: Path, dest: Path) -> None:
    """Copy a shipped file into the dataset folder, replacing (never writing through) a link at `dest`."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)


def download_la(out: Path, base_url: str = LA_URL, workers: int = 4, attempts: int = 3, timeout: float = 60.0,
                sums: Path | None = None, progress: Callable[[str], None] | None = None,
                sizes: Path | None = None, deadline_s: float = DEADLINE_S) -> tuple[int, int]:
    """Fetch every file of the LA SHA256SUMS into `out` in the LA layout, with the split lists.

    Returns (downloaded, already present). Failures are collected and raised together at the end. Each
    file is capped at its size in `sizes` (default: the shipped SIZES) and given `deadline_s` seconds.
    """
    from ..engine.checkpoint import check_writable

    out = Path(out)
    check_writable(out)  # before any work
    sums = sums or la_resource("SHA256SUMS")
    entries = read_sums(sums)
    known = read_sizes(sizes or la_resource("SIZES"))
    for name in ("train.list", "test.list"):
        _copy_in(la_resource(name), out / name)
    _copy_in(sums, out / "SHA256SUMS")

    def one(entry: tuple[str, str]) -> bool:
        digest, name = entry
        fetched = fetch(f"{base_url.rstrip('/')}/{quote(name)}", out / CASES_DIR / name, digest, attempts, timeout,
                        known.get(name), deadline_s)
        if progress is not None:
            progress(f"{'downloaded' if fetched else 'present   '} {name}")
        return fetched

    errors: list[str] = []
    fetched = 0
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        futures = [pool.submit(one, entry) for entry in entries]
        for future in futures:
            try:
                fetched += future.result()
            except DownloadError as exc:
                errors.append(str(exc))
    if errors:
        raise DownloadError(f"{len(errors)} of {len(entries)} files failed:\n" + "\n".join(f"  {e}" for e in errors))
    return fetched, len(entries) - fetched
