"""Download the preprocessed LA files, verified, resumable, and never half-written where a good file goes.

Each file is fetched into `<name>.part` (resumed with an HTTP Range request after an interruption),
its SHA-256 is checked against the shipped `SHA256SUMS`, and only then is it fsynced and renamed into
place. A file already present with the right checksum is kept; one with a wrong checksum is removed
and fetched again. The default source is the UA-MT repository, which hosts the distributed files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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


class DownloadError(DataError):
    """A file could not be fetched or did not match its checksum."""


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
        entries.append((digest.lower(), name.strip().lstrip("*")))
    return entries


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _transfer(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part` (Range from its current size); raise if the body is cut short."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"semiseg/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code == 416 and offset:  # the part already holds the whole file
            return
        raise
    with response:
        resumed = offset and response.status == 206
        if resumed and not str(response.headers.get("Content-Range", "")).startswith(f"bytes {offset}-"):
            raise ConnectionError(f"server answered the range request with {response.headers['Content-Range']!r}")
        expected = response.headers.get("Content-Length")
        received = 0
        with open(part, "ab" if resumed else "wb") as f:
            while block := response.read(CHUNK):
                f.write(block)
                received += len(block)
            f.flush()
            os.fsync(f.fileno())
    if expected is not None and received < int(expected):
        raise ConnectionError(f"transfer interrupted after {received} of {expected} bytes")


def fetch(url: str, dest: Path, sha256: str, attempts: int = 3, timeout: float = 60.0) -> bool:
    """Make `dest` a verified copy of `url`; returns False when a good copy was already there."""
    if dest.is_file():
        if sha256_file(dest) == sha256:
            return False
        dest.unlink()  # a wrong file is worse than none
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    problem = ""
    for _ in range(attempts):
        fresh = not part.exists()
        try:
            _transfer(url, part, timeout)
        except (OSError, HTTPException, ValueError) as exc:  # OSError: URL, connection and timeout errors
            problem = str(getattr(exc, "reason", exc))
            if isinstance(exc, ValueError) or (isinstance(exc, HTTPError) and exc.code == 404):
                break
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


def download_la(out: Path, base_url: str = LA_URL, workers: int = 4, attempts: int = 3, timeout: float = 60.0,
                sums: Path | None = None, progress: Callable[[str], None] | None = None) -> tuple[int, int]:
    """Fetch every file of the LA SHA256SUMS into `out` in the LA layout, with the split lists.

    Returns (downloaded, already present). Failures are collected and raised together at the end.
    """
    out = Path(out)
    sums = sums or la_resource("SHA256SUMS")
    entries = read_sums(sums)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train.list", "test.list"):
        shutil.copyfile(la_resource(name), out / name)
    shutil.copyfile(sums, out / "SHA256SUMS")

    def one(entry: tuple[str, str]) -> bool:
        digest, name = entry
        fetched = fetch(f"{base_url.rstrip('/')}/{quote(name)}", out / CASES_DIR / name, digest, attempts, timeout)
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
