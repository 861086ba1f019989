"""Data loading in bounded memory (issue 19): peak RSS and time of reading + splitting
interactions, today's str-frame reader against the streaming integer-coded one.

For each size N it writes (once, under `--data-root`, never in the repository) a dataset of N
interactions over N/20 users (no users.csv: every user id goes through the coder's dict, the
costly case) and `--items` catalog items, with power-law item popularity, then measures in a
fresh subprocess per (size, reader):

* `coded`: `read_coded` + `split_coded` (training/dataset.py): int32 codes, 21 B a row;
* `frame`: `read_interactions` + `split_interactions`, the str frames `trainer fit` uses today
  (only up to `--frame-max` rows: it is the one that does not fit).

Peak RSS is the process's `ru_maxrss`; "per row" is (peak − the RSS before reading
interactions, i.e. the interpreter, pandas and the catalog ids) / N.

    python -m bench.data --sizes 1000000 10000000 100000000 --frame-max 10000000 \\
        --data-root /tmp/datah/bench --out docs/bench/data

writes `OUT.md` and `OUT.json`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import command_line, cpu_model, loadavg

T0 = 1_700_000_000


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_dataset(path: Path, n_rows: int, n_items: int, seed: int = 0, chunk: int = 5_000_000) -> float:
    """interactions.csv (user_id, item_id, timestamp), items.csv (item_id), schema.json; seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    t = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_users = max(1, n_rows // 20)
    (tmp / "schema.json").write_text(json.dumps({"user": {"features": {}}, "item": {"features": {}}}))
    ids = pc.binary_join_element_wise("i", pc.cast(pa.array(np.arange(n_items)), pa.string()), "")
    pacsv.write_csv(pa.table({"item_id": ids}), tmp / "items.csv")
    order = rng.permutation(n_items)  # popularity rank -> item
    opts = pacsv.WriteOptions(include_header=True, quoting_style="none")
    with pacsv.CSVWriter(tmp / "interactions.csv", pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                                                               ("timestamp", pa.int64())]), write_options=opts) as w:
        for lo in range(0, n_rows, chunk):
            m = min(chunk, n_rows - lo)
            users = rng.integers(0, n_users, m)
            items = order[np.minimum((n_items * rng.random(m) ** 3).astype(np.int64), n_items - 1)]
            w.write_table(pa.table({
                "user_id": pc.binary_join_element_wise("u", pc.cast(pa.array(users), pa.string()), ""),
                "item_id": pc.binary_join_element_wise("i", pc.cast(pa.array(items), pa.string()), ""),
                "timestamp": pa.array(T0 + rng.integers(0, 90 * 86400, m)),
            }))
    tmp.rename(path)
    return time.perf_counter() - t


def measure(data: Path, reader: str) -> dict:
    """In this (fresh) process: read + split with `reader`; RSS and seconds of each stage."""
    import pandas as pd

    from training import dataset as D
    from training.split import split_interactions

    items = D._read_id_column(data / "items.csv", "item_id")  # noqa: SLF001 - the catalog ids, as read_coded reads them
    base = _rss_mib()
    t = time.perf_counter()
    if reader == "coded":
        coded = D.read_interactions_coded(data, items, pd.Index([], dtype=object))
        n, data_bytes = len(coded), coded.nbytes
    else:
        frame = D.read_interactions(data)
        n, data_bytes = len(frame), int(frame.memory_usage(deep=True).sum())
    read_s, read_rss = time.perf_counter() - t, _rss_mib()
    t = time.perf_counter()
    if reader == "coded":
        split = D.split_coded(coded)
        fit_rows = len(split.fit)
    else:
        split = split_interactions(frame)
        fit_rows = len(split.fit)
    split_s, peak = time.perf_counter() - t, _rss_mib()
    return {
        "reader": reader, "rows": n, "fit_rows": fit_rows, "read_s": round(read_s, 1), "split_s": round(split_s, 1),
        "base_rss_mib": round(base), "read_peak_rss_mib": round(read_rss), "peak_rss_mib": round(peak),
        "data_bytes_per_row": round(data_bytes / n, 1),
        "read_bytes_per_row": round((read_rss - base) * 2**20 / n, 1),
        "peak_bytes_per_row": round((peak - base) * 2**20 / n, 1),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_measure"]:
        print(json.dumps(measure(Path(argv[1]), argv[2])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--frame-max", type=int, default=3_000_000, help="largest size the str-frame reader is run at")
    ap.add_argument("--readers", nargs="+", default=["frame", "coded"], choices=["frame", "coded"])
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="report path without suffix (.md and .json are written)")
    a = ap.parse_args(argv)
    runs, made = [], {}
    for n in a.sizes:
        data = a.data_root / f"n{n}_i{a.items}"
        if not data.exists():
            made[n] = round(write_dataset(data, n, a.items), 1)
        for reader in a.readers:
            if reader == "frame" and n > a.frame_max:
                continue
            p = subprocess.run([sys.executable, "-m", "bench.data", "_measure", str(data), reader],
                               capture_output=True, text=True)
            if p.returncode != 0:
                runs.append({"reader": reader, "rows": n, "error": p.stderr.strip().splitlines()[-1:]})
            else:
                runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    report = {"command": command_line("bench.data", argv), "cpu": cpu_model(), "loadavg": loadavg(),
              "items": a.items, "users": "rows / 20 (no users.csv)", "generated_s": made, "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"`{report['command']}`", "", f"CPU {report['cpu']}, load {report['loadavg']}; {a.items:,} catalog items, "
             "users = rows / 20 (no users.csv).", "",
             "| reader | rows | read s | split s | peak RSS MiB | read B/row | read+split B/row | data B/row |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['reader']} | {r['rows']:,} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['reader']} | {r['rows']:,} | {r['read_s']} | {r['split_s']} | {r['peak_rss_mib']:,} | "
                     f"{r['read_bytes_per_row']} | {r['peak_bytes_per_row']} | {r['data_bytes_per_row']} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
