"""Pack the LA dataset into a few compact, lossless parts, so it can travel to a lent GPU machine call by call.

The device tool carries at most 64 MiB per call, and the LA data is 223 MB of gzip-compressed h5. The LA images
(`mri_norm2.h5`) are normalised 8-bit MRI: each volume has at most a few hundred distinct float32 values. A part
stores, per case, that value table, the uint8 index volume and the bit-packed label, each bz2-compressed (about 1.4 MB
a case instead of 2.2 MB), plus SHA-256 digests of the original image and label arrays. Unpacking rebuilds the
standard LA layout (h5 files, `train.list`, `test.list`) and checks every array against its digest, so the data a
GPU run reads is exactly the data here. Parts can be unpacked one per call; finished cases are skipped.

    python benchmarks/stage_la.py pack --la-root ../shared/data/LA --out .stage --part-mb 60
    python benchmarks/stage_la.py unpack .stage/la-part-0.npz --out /tmp/LA      # on the device, one call a part
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import os
from pathlib import Path

import numpy as np

CASES_DIR = "2018LA_Seg_Training Set"


def digest(array: np.ndarray) -> str:
    """SHA-256 of the array's dtype, shape and bytes (C order)."""
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def encode_case(image: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    """Lossless compact arrays for one case: a value table + uint8 indices when the image allows, else raw float."""
    values, index = np.unique(image, return_inverse=True)
    if len(values) <= 256:
        image_bytes = bz2.compress(index.astype(np.uint8).tobytes(), 9)
    else:
        values = np.zeros(0, image.dtype)
        image_bytes = bz2.compress(np.ascontiguousarray(image).tobytes(), 9)
    if label.min() < 0 or label.max() > 1:
        raise ValueError(f"LA labels are binary; got values {np.unique(label)[:10]}")
    return {"values": values, "image": np.frombuffer(image_bytes, np.uint8),
            "label": np.frombuffer(bz2.compress(np.packbits(label.astype(bool)).tobytes(), 9), np.uint8)}


def decode_case(entry: dict, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    shape, dtype = tuple(entry["shape"]), np.dtype(entry["image_dtype"])
    raw = bz2.decompress(arrays["image"].tobytes())
    values = arrays["values"]
    image = values[np.frombuffer(raw, np.uint8)] if len(values) else np.frombuffer(raw, dtype)
    n = int(np.prod(shape))
    label = np.unpackbits(np.frombuffer(bz2.decompress(arrays["label"].tobytes()), np.uint8))[:n]
    return image.reshape(shape).astype(dtype), label.reshape(shape).astype(np.dtype(entry["label_dtype"]))


def pack(la_root: Path, out: Path, part_mb: float) -> list[Path]:
    from semiseg.data.h5 import read_case

    lists = {name: (la_root / name).read_text().split() for name in ("train.list", "test.list")}
    ids = [*lists["train.list"], *lists["test.list"]]
    out.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []
    arrays: dict[str, np.ndarray] = {}
    entries: list[dict] = []

    def flush() -> None:
        manifest = {"lists": lists, "cases": entries}
        path = out / f"la-part-{len(parts)}.npz"
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, manifest=np.frombuffer(json.dumps(manifest).encode(), np.uint8), **arrays)
        os.replace(tmp, path)
        parts.append(path)

    size = 0
    for case_id in ids:
        case = read_case(la_root / CASES_DIR / case_id / "mri_norm2.h5", case_id, 2)
        image, label = case.image[0], case.label
        encoded = encode_case(image, label)
        case_size = sum(a.nbytes for a in encoded.values())
        if entries and size + case_size > part_mb * 2**20:
            flush()
            arrays, entries, size = {}, [], 0
        arrays.update({f"{case_id}.{k}": v for k, v in encoded.items()})
        entries.append({"id": case_id, "shape": list(image.shape), "image_dtype": image.dtype.str,
                        "label_dtype": label.dtype.str, "image_sha256": digest(image),
                        "label_sha256": digest(label)})
        size += case_size
    flush()
    return parts


def unpack(part: Path, out: Path) -> int:
    """Write the part's cases into `out` (LA layout), verifying each; returns the number of cases written."""
    from semiseg.data.h5 import write_case

    with np.load(part, allow_pickle=False) as data:
        manifest = json.loads(data["manifest"].tobytes())
        written = 0
        for entry in manifest["cases"]:
            target = out / CASES_DIR / entry["id"] / "mri_norm2.h5"
            if target.is_file():
                continue
            arrays = {k: data[f"{entry['id']}.{k}"] for k in ("values", "image", "label")}
            image, label = decode_case(entry, arrays)
            if digest(image) != entry["image_sha256"] or digest(label) != entry["label_sha256"]:
                raise SystemExit(f"{part}: case {entry['id']} does not match its digest; pack it again")
            write_case(target, image, label)  # atomic: a killed call leaves no half-written case
            written += 1
    for name, ids in manifest["lists"].items():
        (out / name).write_text("".join(f"{i}\n" for i in ids))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--la-root", default=os.environ.get("SEMISEG_LA_ROOT", str(Path(__file__).resolve().parents[2]
                                                                              / "shared" / "data" / "LA")))
    p.add_argument("--out", default=".stage")
    p.add_argument("--part-mb", type=float, default=60.0, help="largest part, MiB (the device carries 64 MiB a call)")
    u = sub.add_parser("unpack")
    u.add_argument("parts", nargs="+")
    u.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.verb == "pack":
        for path in pack(Path(args.la_root), Path(args.out), args.part_mb):
            print(f"{path} {path.stat().st_size / 2**20:.1f} MiB")
        return
    for part in args.parts:
        print(f"{part}: {unpack(Path(part), Path(args.out))} cases written to {args.out}")


if __name__ == "__main__":
    main()
