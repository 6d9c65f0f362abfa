"""LA download against a real HTTP server on 127.0.0.1: checksums, corrupted files, interrupted transfers."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from semiseg.data.download import DownloadError, download_la, la_resource, read_sums, sha256_file
from semiseg.data.h5 import read_case, write_case
from semiseg.data.layouts import open_layout
from semiseg.data.layouts.la import CASES_DIR
from semiseg.errors import DataError

IDS = [line.strip() for line in la_resource("train.list").read_text().splitlines()[:3]]
PREFIX = "/data/2018LA_Seg_Training Set/"


class FileServer:
    """Serves `files` under PREFIX with Range support; can cut a body short once or serve wrong bytes."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.cut_once: set[str] = set()
        self.corrupt: set[str] = set()
        self.endless: set[str] = set()  # body without Content-Length that goes on past the file (8 MiB of junk)
        self.slow: set[str] = set()  # one byte every 0.2 s, each read well within the socket timeout
        self.ranges = True
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                name = unquote(self.path).removeprefix(PREFIX)
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                if name in server.corrupt:
                    body = body[:-8] + b"CORRUPT!"
                start = 0
                if server.ranges and self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                rest = body[start:]
                if name in server.endless or name in server.slow:
                    self.end_headers()
                    try:
                        if name in server.endless:
                            self.wfile.write(rest)
                            for _ in range(8):
                                self.wfile.write(b"\0" * (1 << 20))
                        for i in range(25 if name in server.slow else 0):
                            self.wfile.write(rest[i:i + 1])
                            self.wfile.flush()
                            time.sleep(0.2)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client gave up, as it should
                    return
                self.send_header("Content-Length", str(len(rest)))
                self.end_headers()
                if name in server.cut_once:
                    server.cut_once.discard(name)
                    self.wfile.write(rest[: len(rest) // 2])  # then the connection closes mid-body
                    return
                self.wfile.write(rest)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{PREFIX.replace(' ', '%20')}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def gets(self, name: str) -> list[str | None]:
        return [r for n, r in self.requests if n == name]


@pytest.fixture
def served(tmp_path: Path):
    """Three tiny real h5 cases named like LA files, their SHA256SUMS, and a running server."""
    files = {}
    for i, case_id in enumerate(IDS):
        path = tmp_path / "src" / case_id / "mri_norm2.h5"
        rng = np.random.default_rng(i)
        write_case(path, rng.standard_normal((20, 18, 12)).astype(np.float32), (rng.random((20, 18, 12)) > 0.5))
        files[f"{case_id}/mri_norm2.h5"] = path.read_bytes()
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in files.items()))
    (tmp_path / "SIZES").write_text("".join(f"{len(b)}  {n}\n" for n, b in files.items()))
    server = FileServer(files)
    server.thread.start()
    yield server, sums, tmp_path / "LA"
    server.httpd.shutdown()
    server.httpd.server_close()


def _parts(root: Path) -> list[Path]:
    return sorted(root.rglob("*.part"))


def test_download_verifies_writes_la_layout_and_skips_good_files(served) -> None:
    server, sums, out = served
    assert download_la(out, server.url, workers=2, sums=sums) == (3, 0)
    for name, body in server.files.items():
        assert (out / CASES_DIR / name).read_bytes() == body
    assert _parts(out) == []
    assert (out / "train.list").read_text() == la_resource("train.list").read_text()
    layout = open_layout(out)
    assert layout.name == "la" and layout.train_ids[:3] == IDS
    case = read_case(layout.case_path(IDS[0]), IDS[0], 2)
    assert case.image.shape == (1, 20, 18, 12)
    n_requests = len(server.requests)
    assert download_la(out, server.url, workers=2, sums=sums) == (0, 3)
    assert len(server.requests) == n_requests  # verified by checksum, not fetched again


def test_corrupted_file_is_rejected_and_not_left_in_place(served) -> None:
    server, sums, out = served
    bad = f"{IDS[1]}/mri_norm2.h5"
    server.corrupt.add(bad)
    with pytest.raises(DownloadError, match=rf"{IDS[1]}/mri_norm2.h5.*SHA-256"):
        download_la(out, server.url, workers=1, sums=sums)
    assert not (out / CASES_DIR / bad).exists()
    assert _parts(out) == []
    assert len(server.gets(bad)) == 1  # a fresh complete copy that is wrong is not fetched again
    good = out / CASES_DIR / f"{IDS[0]}/mri_norm2.h5"
    assert sha256_file(good) == hashlib.sha256(server.files[f"{IDS[0]}/mri_norm2.h5"]).hexdigest()


def test_wrong_existing_file_is_replaced(served) -> None:
    server, sums, out = served
    name = f"{IDS[2]}/mri_norm2.h5"
    target = out / CASES_DIR / name
    target.parent.mkdir(parents=True)
    target.write_bytes(b"stale or truncated copy")
    assert download_la(out, server.url, workers=1, sums=sums) == (3, 0)
    assert target.read_bytes() == server.files[name]


def test_interrupted_transfer_resumes_with_range(served) -> None:
    server, sums, out = served
    name = f"{IDS[0]}/mri_norm2.h5"
    server.cut_once.add(name)
    assert download_la(out, server.url, workers=1, sums=sums, attempts=3) == (3, 0)
    half = len(server.files[name]) // 2
    assert server.gets(name) == [None, f"bytes={half}-"]
    assert (out / CASES_DIR / name).read_bytes() == server.files[name]
    assert _parts(out) == []


def test_interrupted_run_leaves_only_a_part_then_a_second_run_resumes(served) -> None:
    server, sums, out = served
    name = f"{IDS[0]}/mri_norm2.h5"
    server.cut_once.add(name)
    with pytest.raises(DownloadError, match="interrupted after"):
        download_la(out, server.url, workers=1, sums=sums, attempts=1)
    target = out / CASES_DIR / name
    assert not target.exists()
    part = target.with_name(target.name + ".part")
    half = len(server.files[name]) // 2
    assert part.stat().st_size == half
    assert download_la(out, server.url, workers=1, sums=sums, attempts=1) == (1, 2)
    assert server.gets(name) == [None, f"bytes={half}-"]
    assert target.read_bytes() == server.files[name] and not part.exists()


def test_server_ignoring_range_restarts_the_part(served) -> None:
    server, sums, out = served
    name = f"{IDS[1]}/mri_norm2.h5"
    server.cut_once.add(name)
    server.ranges = False
    assert download_la(out, server.url, workers=1, sums=sums) == (3, 0)
    assert (out / CASES_DIR / name).read_bytes() == server.files[name]


def test_missing_file_names_the_url(served) -> None:
    server, sums, out = served
    sums.write_text(sums.read_text() + f"{'0' * 64}  NOSUCHCASE/mri_norm2.h5\n")
    with pytest.raises(DownloadError, match=r"1 of 4 files failed(.|\n)*NOSUCHCASE.*Not Found"):
        download_la(out, server.url, workers=2, sums=sums)
    assert server.gets("NOSUCHCASE/mri_norm2.h5") == [None]


def test_read_sums_rejects_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "SHA256SUMS"
    path.write_text("abc  x/mri_norm2.h5\n")
    with pytest.raises(DataError, match=r"SHA256SUMS:1: expected"):
        read_sums(path)


def test_shipped_checksums_match_the_reference_data(la_root: Path) -> None:
    assert la_resource("SHA256SUMS").read_text() == (la_root / "SHA256SUMS").read_text()
    for name in ("train.list", "test.list"):
        assert la_resource(name).read_text() == (la_root / name).read_text()
    entries = read_sums(la_resource("SHA256SUMS"))
    assert len(entries) == 100
    for digest, name in entries[:2]:
        assert sha256_file(la_root / CASES_DIR / name) == digest


def test_cli_downloads_then_verifies_against_the_local_server(served, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`semiseg data download la` end to end; the shipped sums are swapped for the three served cases'."""
    from semiseg.cli import main
    from semiseg.data import download

    server, sums, out = served
    shipped = download.la_resource
    monkeypatch.setattr(download, "la_resource", lambda name: sums if name == "SHA256SUMS" else shipped(name))
    server.cut_once.add(f"{IDS[2]}/mri_norm2.h5")
    for expected in ("3 downloaded, 0 already present", "0 downloaded, 3 already present"):
        monkeypatch.setattr(sys, "argv", ["semiseg", "data", "download", "la", "--out", str(out), "--base-url",
                                          server.url, "--workers", "2"])
        with pytest.raises(SystemExit) as info:
            main()
        captured = capsys.readouterr()
        assert info.value.code == 0, captured.err
        assert f"{expected} and verified: {out}" in captured.out
    assert all((out / CASES_DIR / name).read_bytes() == body for name, body in server.files.items())
    assert (out / "SHA256SUMS").read_text() == sums.read_text() and _parts(out) == []


def test_cli_reports_every_bad_file_and_exits_2(served, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from semiseg.cli import main

    server, _, out = served
    server.files = {name: b"not the real file" for name in server.files}  # the shipped sums cannot match
    monkeypatch.setattr(sys, "argv", ["semiseg", "data", "download", "la", "--out", str(out), "--base-url",
                                      server.url])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "100 of 100 files failed" in err and err.count("does not match the expected") == 3
    assert err.count("Not Found") == 97
    assert not list((out / CASES_DIR).rglob("*.h5")) and _parts(out) == []


# ---- hostile servers and planted links (issue 15): bounded size and time, nothing followed -----------------------

def test_endless_body_is_cut_at_the_expected_size_and_removed(served) -> None:
    server, sums, out = served
    name = f"{IDS[0]}/mri_norm2.h5"
    server.endless.add(name)
    with pytest.raises(DownloadError, match=rf"{name}: download .* more than the expected "
                                            rf"{len(server.files[name])} bytes; the partial file was removed"):
        download_la(out, server.url, workers=1, sums=sums, sizes=sums.with_name("SIZES"))
    assert not (out / CASES_DIR / name).exists() and _parts(out) == []
    assert len(server.gets(name)) == 1  # not retried


def test_trickling_server_meets_the_overall_deadline(served) -> None:
    server, sums, out = served
    name = f"{IDS[1]}/mri_norm2.h5"
    server.slow.add(name)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=rf"{name}: download .* not complete within the deadline"):
        download_la(out, server.url, workers=1, sums=sums, timeout=2.0, deadline_s=1.0)
    assert time.monotonic() - started < 4.0  # the 25-byte trickle would take 5 s; each read is within 2 s
    assert _parts(out) == [] and not (out / CASES_DIR / name).exists()


def test_symlinked_part_is_not_followed(served, tmp_path: Path) -> None:
    server, sums, out = served
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    name = f"{IDS[0]}/mri_norm2.h5"
    part = out / CASES_DIR / f"{name}.part"
    part.parent.mkdir(parents=True)
    part.symlink_to(victim)
    with pytest.raises(DownloadError, match=r"mri_norm2.h5.part: the partial download is a symbolic link"):
        download_la(out, server.url, workers=1, sums=sums)
    assert victim.read_text() == "precious" and part.is_symlink()


def test_split_lists_replace_a_planted_link_instead_of_writing_through_it(served, tmp_path: Path) -> None:
    server, sums, out = served
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out.mkdir()
    (out / "train.list").symlink_to(victim)
    download_la(out, server.url, workers=1, sums=sums)
    assert victim.read_text() == "precious" and not (out / "train.list").is_symlink()


def test_sums_entries_must_stay_inside_the_dataset_folder(tmp_path: Path) -> None:
    for name in ("../../evil.h5", "/etc/evil.h5", "a/../../b.h5"):
        path = tmp_path / "SHA256SUMS"
        path.write_text(f"{'0' * 64}  ok/mri_norm2.h5\n{'0' * 64}  {name}\n")
        with pytest.raises(DataError, match=r"SHA256SUMS:2: path .* would lead outside the dataset folder"):
            read_sums(path)


def test_shipped_sizes_list_every_file_of_the_sums(la_root: Path) -> None:
    from semiseg.data.download import read_sizes

    sizes = read_sizes(la_resource("SIZES"))
    names = [name for _, name in read_sums(la_resource("SHA256SUMS"))]
    assert sorted(sizes) == sorted(names)
    for name in names[:5]:
        assert (la_root / CASES_DIR / name).stat().st_size == sizes[name]
