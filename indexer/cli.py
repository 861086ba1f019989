"""`indexer` command line: rebuild, update, list, verify and roll back index versions.

Cron-friendly: logs (with per-stage timings) go to stdout, a progress bar to stderr only when
stderr is a terminal, and a failure prints exactly one line to stderr and exits with a code
that says what went wrong (see EXIT_* and `indexer --help`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected error (a bug, disk full, ...): details with -v
EXIT_BAD_INPUT = 2  # bad usage, model, dataset, options or version name
EXIT_LOCKED = 3  # another rebuild / rollback holds INDEX_ROOT/.lock
EXIT_GATE = 4  # the new index's recall is below --recall-gate; current kept
EXIT_CORRUPT = 5  # a version failed verification (checksums, counts, model version)
EXIT_DELTA_TOO_LARGE = 6  # `update` would exceed --max-delta: run `rebuild`

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  unexpected failure (run with -v for a traceback)
  2  bad input: usage, model bundle, dataset, index options, unknown version
  3  another indexer run holds INDEX_ROOT/.lock (nothing done)
  4  recall gate failed (the new index is discarded, current unchanged)
  5  verification failed (corrupt or inconsistent version; current unchanged)
  6  update: the delta would exceed --max-delta of the catalog; run rebuild (current unchanged)
On failure exactly one line is printed to stderr; `current` is never left half-switched.
"""


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one stderr line (exit 2) instead of usage + error, for cron mail."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="indexer",
        description="Build, verify and switch FAISS index versions for the two-tower retrieval service.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = _OneLineParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks on failure")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings only (stdout keeps the result line)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "rebuild",
        parents=[common],
        help="embed the catalog, build + gate a new index version, switch current",
        description="Embed every catalog item with the model's item tower, build a FAISS index in a new "
        "version directory, gate it on recall@k against exact search, then switch INDEX_ROOT/current "
        "atomically and prune old versions. Prints the new version directory as the last stdout line.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--model", required=True, type=Path, help="model bundle directory, or a models directory (newest bundle)")
    r.add_argument("--data", required=True, type=Path, help="dataset directory (its items.csv / items.parquet is the catalog)")
    r.add_argument("--out", required=True, type=Path, help="INDEX_ROOT (created if missing)")
    r.add_argument("--index", default="auto", metavar="auto|FACTORY",
                   help='"auto" (by catalog size) or a FAISS factory string: Flat, HNSW32, "IVF1024,Flat", '
                   '"IVF4096,PQ32x8" (always inner product). Default: auto')
    r.add_argument("--ef-search", type=int, help="HNSW efSearch (default: tuned to reach the gate + 0.01)")
    r.add_argument("--nprobe", type=int, help="IVF nprobe (default: tuned to reach the gate + 0.01)")
    r.add_argument("--ef-construction", type=int, help="HNSW efConstruction (default 40)")
    r.add_argument("--recall-gate", type=float, default=0.95, help="minimum recall@k vs exact search (default 0.95)")
    r.add_argument("--gate-k", type=int, default=100, help="k of the recall gate (default 100)")
    r.add_argument("--gate-queries", type=int, default=1000, help="queries in the gate sample (default 1000)")
    r.add_argument("--keep", type=int, default=5, help="versions to keep, current always kept (default 5)")
    r.add_argument("--seed", type=int, default=0, help="seed for query sampling and k-means (default 0)")
    r.add_argument("--threads", type=int, help="FAISS threads (default: OMP_NUM_THREADS or all usable CPUs)")
    r.add_argument("--embed-batch", type=int, default=65_536,
                   help="catalog rows per item-tower call; under torchrun the unit the ranks split the catalog by "
                   "(default 65536)")
    bar = r.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="force a progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    u = sub.add_parser(
        "update",
        parents=[common],
        help="publish the catalog's changes (new, changed, removed items; attributes) as a delta version",
        description="Diff the catalog against the current version and publish a delta version that shares the "
        "base version's index: new and feature-changed items embedded with the current version's item tower, "
        "removed ones tombstoned, attribute changes applied without re-embedding; gated on the merged recall, "
        "loaded as the service will, then switched atomically. Give --data (a whole items.csv) or --upsert "
        "and/or --remove (item events: upsert rows in the items.csv format; remove: a CSV with an item_id "
        "column). Prints the new version directory as the last stdout line.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    u.add_argument("--root", required=True, type=Path, help="INDEX_ROOT (its current version is updated)")
    u.add_argument("--data", type=Path, help="dataset directory: its items.csv / items.parquet is the new catalog")
    u.add_argument("--upsert", type=Path, help="rows to add or replace, in the items.csv format (.csv / .parquet)")
    u.add_argument("--remove", type=Path, help="a CSV with an item_id column: the items to remove")
    u.add_argument("--max-delta", type=float, default=0.05,
                   help="refuse (exit 6) when delta rows or tombstones exceed this fraction of the catalog (default 0.05)")
    u.add_argument("--recall-gate", type=float, default=0.95, help="minimum merged recall@k vs exact (default 0.95)")
    u.add_argument("--gate-k", type=int, default=100, help="k of the recall gate (default 100)")
    u.add_argument("--gate-queries", type=int, default=200, help="queries in the gate sample (default 200)")
    u.add_argument("--keep", type=int, default=5, help="versions to keep, current and referenced bases always kept (default 5)")
    u.add_argument("--seed", type=int, default=0, help="seed for the gate's query sample (default 0)")

    ls = sub.add_parser("list", parents=[common], help="list index versions (newest last; * marks current)")
    ls.add_argument("--root", required=True, type=Path, help="INDEX_ROOT")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")

    v = sub.add_parser("verify", parents=[common], help="verify a version: checksums, counts, dims, model version, recall",
                       epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("version", nargs="?", help="version name (default: current)")
    v.add_argument("--root", required=True, type=Path, help="INDEX_ROOT")
    v.add_argument("--recall-queries", type=int, default=200,
                   help="item vectors used to re-measure recall@k vs exact (0: skip; default 200)")

    rb = sub.add_parser("rollback", parents=[common], help="point current at VERSION, or at the version before current",
                        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    rb.add_argument("version", nargs="?", help="version name (default: the newest version older than current)")
    rb.add_argument("--root", required=True, type=Path, help="INDEX_ROOT")
    return p


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # "Loading faiss with AVX2 ..." noise
    logging.captureWarnings(True)  # library warnings go to the log, keeping stderr to one line


def _cmd_rebuild(args: argparse.Namespace) -> None:
    from indexer.rebuild import RebuildConfig, rebuild_on_ranks
    from training.distributed import session

    cfg = RebuildConfig(
        model=args.model, data=args.data, out=args.out, index=args.index, ef_search=args.ef_search,
        nprobe=args.nprobe, ef_construction=args.ef_construction, recall_gate=args.recall_gate,
        gate_k=args.gate_k, gate_queries=args.gate_queries, keep=args.keep, seed=args.seed,
        threads=args.threads, embed_batch=args.embed_batch, progress=args.progress,
    )
    # under torchrun (WORLD_SIZE > 1) the ranks share the embedding step; rank 0 does the rest
    with session("cpu") as ranks:
        if not ranks.is_main:  # rank 0 logs the run; the others only their warnings
            logging.getLogger().setLevel(logging.WARNING)
        result = rebuild_on_ranks(cfg, ranks)
    if result is not None:
        print(result.path.resolve())


def _cmd_update(args: argparse.Namespace) -> None:
    from indexer.update import UpdateConfig, update

    cfg = UpdateConfig(
        root=args.root, data=args.data, upsert=args.upsert, remove=args.remove, max_delta=args.max_delta,
        recall_gate=args.recall_gate, gate_k=args.gate_k, gate_queries=args.gate_queries, keep=args.keep,
        seed=args.seed,
    )
    result = update(cfg)
    print(result.path.resolve())


def _cmd_list(args: argparse.Namespace) -> None:
    from indexer import store
    from indexer.version import read_manifest

    cur = store.read_current(args.root)
    for p in store.list_versions(args.root):
        try:
            m = read_manifest(p)
            row = {
                "version": p.name, "current": cur is not None and p.resolve() == cur,
                "model_version": m["model_version"], "created_at": m["created_at"], "count": m["count"],
                "dim": m["dim"], "factory": (m["index"] or {}).get("factory"),
                "search_params": (m["index"] or {}).get("search_params"),
                "recall": (m["recall"] or {}).get("value"),
                "base": (m.get("delta") or {}).get("base"),
                "delta_rows": (m.get("delta") or {}).get("delta_rows"),
                "tombstones": (m.get("delta") or {}).get("tombstones"),
            }
        except store.IndexVersionError as e:
            row = {"version": p.name, "current": cur is not None and p.resolve() == cur, "error": str(e)}
        if args.json:
            print(json.dumps(row, sort_keys=True))
        elif "error" in row:
            print(f"{'*' if row['current'] else ' '} {row['version']}  UNREADABLE: {row['error']}")
        else:
            print(f"{'*' if row['current'] else ' '} {row['version']}  model={row['model_version']}  "
                  f"items={row['count']}  dim={row['dim']}  index={row['factory']} {row['search_params']}  "
                  f"recall={row['recall']}  created={row['created_at']}"
                  + (f"  delta: base={row['base']} rows={row['delta_rows']} tombstones={row['tombstones']}"
                     if row["base"] else ""))


def _cmd_verify(args: argparse.Namespace) -> None:
    import numpy as np

    from indexer import faiss_index as fi
    from indexer import store
    from indexer.version import open_search_files, verify_version

    if args.version:
        path = store.version_path(args.root, args.version)
    else:
        path = store.read_current(args.root)
        if path is None:
            raise store.VersionNotFoundError(f"{args.root}: no current version to verify")
    m = verify_version(path)
    out = {"version": path.name, "ok": True, "count": m["count"], "dim": m["dim"], "model_version": m["model_version"],
           "gate_recall": (m["recall"] or {}).get("value")}
    if m.get("delta") is not None:
        out["base"] = m["delta"]["base"]
    if args.recall_queries > 0 and m.get("delta") is not None:
        # the merged search (base index, tombstones excluded, exact delta) against an exact scan
        from indexer.topk import recall_against_exact
        from indexer.version import load_version

        topk = load_version(path, check_hashes=False).topk  # just verified
        live = np.flatnonzero(topk.live.mask)  # type: ignore[attr-defined]
        rng = np.random.default_rng(0)
        q = np.asarray(topk.embeddings[np.sort(rng.choice(live, size=min(args.recall_queries, len(live)), replace=False))])
        k = min(int((m["recall"] or {}).get("k") or 100), len(live))
        out["item_query_recall"] = round(recall_against_exact(topk, q, k), 6)
        out["recall_k"] = k
    elif args.recall_queries > 0:
        index, emb, _ = open_search_files(path, m)
        emb = np.asarray(emb)
        k = min(int((m["recall"] or {}).get("k") or 100), len(emb))
        rng = np.random.default_rng(0)
        q = emb[np.sort(rng.choice(len(emb), size=min(args.recall_queries, len(emb)), replace=False))]
        out["item_query_recall"] = round(fi.measure_recall(index, emb, q, k), 6)
        out["recall_k"] = k
    print(json.dumps(out, sort_keys=True))


def _cmd_rollback(args: argparse.Namespace) -> None:
    from indexer import store

    print(store.rollback(args.root, args.version))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args)
    from indexer import store
    from indexer.rebuild import RebuildInputError, RecallGateError
    from indexer.update import DeltaTooLargeError

    commands = {"rebuild": _cmd_rebuild, "update": _cmd_update, "list": _cmd_list, "verify": _cmd_verify,
                "rollback": _cmd_rollback}
    try:
        commands[args.cmd](args)
    except store.LockHeldError as e:
        code, msg = EXIT_LOCKED, str(e)
    except RecallGateError as e:
        code, msg = EXIT_GATE, str(e)
    except DeltaTooLargeError as e:
        code, msg = EXIT_DELTA_TOO_LARGE, str(e)
    except store.VersionNotFoundError as e:
        code, msg = EXIT_BAD_INPUT, str(e)
    except store.IndexVersionError as e:
        code, msg = EXIT_CORRUPT, str(e)
    except (RebuildInputError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        code, msg = EXIT_BAD_INPUT, str(e)
    except KeyboardInterrupt:
        code, msg = 130, "interrupted"
    except Exception as e:  # noqa: BLE001 - one line for cron, the traceback with -v
        logging.getLogger("indexer").debug("traceback", exc_info=True)
        code, msg = EXIT_FAILURE, f"{type(e).__name__}: {e}"
    else:
        return EXIT_OK
    one_line = " ".join(str(msg).split())
    print(f"indexer {args.cmd}: error: {one_line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
