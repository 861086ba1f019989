"""`trainer` command line (INTERFACES.md §2).

Every command exits 0 on success; on failure it prints one line to stderr and exits non-zero:
2 for bad input (usage, dataset, config), 1 for anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from training.bundle import Bundle
    from training.dataset import Dataset

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer", description="Train and evaluate two-tower retrieval models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    prep = sub.add_parser("prepare", help="write a dataset directory")
    prep_sub = prep.add_subparsers(dest="source", required=True)
    ml = prep_sub.add_parser("movielens-100k", help="convert the GroupLens ml-100k folder")
    ml.add_argument("--src", required=True, help="folder with u.data, u.user, u.item, u.genre")
    ml.add_argument("--out", required=True, help="dataset directory to create")
    syn = prep_sub.add_parser("synthetic", help="generate a synthetic dataset (no download)")
    syn.add_argument("--out", required=True)
    syn.add_argument("--users", type=int, default=2000)
    syn.add_argument("--items", type=int, default=1000)
    syn.add_argument("--interactions", type=int, default=60000)
    syn.add_argument("--seed", type=int, default=0)
    sh = prep_sub.add_parser(
        "shards", help="write integer-coded Parquet shards of a dataset's training rows (each torchrun rank reads its own)"
    )
    sh.add_argument("--data", required=True, help="dataset directory")
    sh.add_argument("--out", required=True, help="shards directory to create")
    sh.add_argument("--shards", type=int, required=True, help="number of shards (a multiple of the ranks that read them)")
    sh.add_argument("--rows", default="full", choices=["full", "train", "fit"],
                    help="which rows: every click (fit --full), fit + val, or the tuning rows (EVAL.md)")
    sh.add_argument("--seed", type=int, default=0, help="seed of the row-to-shard assignment")

    f = sub.add_parser("fit", help="train a model; prints the bundle path as the last stdout line")
    f.add_argument("--data", required=True, help="dataset directory")
    f.add_argument("--out", required=True, help="models directory (a new <version>/ is created)")
    f.add_argument("--config", help="JSON training config (see training/config.py TrainConfig)")
    f.add_argument("--full", action="store_true", help="train on every interaction (nightly production mode)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("evaluate", help="print EVAL.md metrics of a bundle as one JSON object")
    e.add_argument("--data", required=True)
    e.add_argument("--model", required=True, help="bundle directory (or models dir: newest bundle)")

    x = sub.add_parser(
        "export",
        help="write a bundle's towers as ONNX (encoded inputs) + preprocessing.json + manifest; prints the directory",
    )
    x.add_argument("--model", required=True, help="bundle directory (or models dir: newest bundle)")
    x.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help="onnx (torchscript: not supported)")
    x.add_argument("--out", required=True, help="export directory to create (must not exist)")
    return p


def _run(args: argparse.Namespace) -> None:
    if args.cmd == "prepare":
        from training.prepare import prepare_movielens_100k, prepare_synthetic

        if args.source == "movielens-100k":
            out = prepare_movielens_100k(args.src, args.out)
        elif args.source == "shards":
            from training.shards import write_shards

            out = write_shards(args.data, args.out, args.shards, rows=args.rows, seed=args.seed)
        else:
            out = prepare_synthetic(args.out, args.users, args.items, args.interactions, args.seed, warn=_warn(args))
        print(out)
    elif args.cmd == "fit":
        from training.config import TrainConfig
        from training.distributed import session
        from training.train import fit, pick_device

        cfg = TrainConfig.from_file(args.config)
        # under torchrun (WORLD_SIZE > 1): data-parallel over the ranks, gloo on CPU / NCCL on CUDA
        with session(pick_device(cfg.device)) as ranks:
            if not ranks.is_main:  # rank 0 logs the run; the others only their warnings
                logging.getLogger().setLevel(logging.WARNING)
            path = fit(args.data, args.out, cfg, full=args.full, progress=False if args.no_progress else None, ranks=ranks)
            if ranks.is_main:  # one result line, not one per rank
                print(path)
    elif args.cmd == "evaluate":
        from training.bundle import load_bundle
        from training.dataset import read_dataset
        from training.evaluate import evaluate_model, history_metrics
        from training.split import split_interactions

        bundle = load_bundle(args.model)
        dataset = read_dataset(args.data)
        for warning in check_bundle_matches_dataset(bundle, dataset):
            _warn(args)(warning)
        split = split_interactions(dataset.interactions)
        item_vecs = bundle.model.embed_items(dataset.items)  # once, for both evaluations
        metrics = evaluate_model(bundle.model, dataset, split, item_vecs=item_vecs)
        # EVAL.md "Request-time history": cold_mM / warm_fresh keys and their fold-in anchors
        metrics |= history_metrics(bundle.model, dataset, split, item_vecs=item_vecs, anchors=True)
        print(json.dumps(metrics, sort_keys=True))
    elif args.cmd == "export":
        from training.export import export_bundle

        print(export_bundle(args.model, args.format, args.out))


def _warn(args: argparse.Namespace) -> Callable[[str], None]:
    """A printer of one-line warnings on stderr (stdout carries the command's result only)."""
    return lambda message: print(f"trainer {args.cmd}: warning: {message}", file=sys.stderr)


def check_bundle_matches_dataset(bundle: Bundle, dataset: Dataset) -> list[str]:
    """Refuse (ValueError) a bundle whose feature schema differs from the dataset's: its encoders
    would read other columns, or none (the metrics of such a pairing are meaningless). Return
    warnings for a usable but suspect pairing: other data than it was trained on (the metrics
    are not the manifest's), or a --full bundle (the test rows were in its training data)."""
    from training.artifacts import read_json
    from training.schema import Schema

    config = read_json(bundle.path / "config.json")
    if isinstance(config, dict) and isinstance(config.get("schema"), dict):
        trained = Schema.from_json(config["schema"], source=f"{bundle.path}/config.json").to_json()
        given = dataset.schema.to_json()
        show = lambda spec: json.dumps(spec, sort_keys=True) if spec else "absent"  # noqa: E731
        diffs = [
            f"{side}.{name}: bundle {show(trained[side]['features'].get(name))}, "
            f"dataset {show(given[side]['features'].get(name))}"
            for side in ("user", "item")
            for name in sorted(set(trained[side]["features"]) | set(given[side]["features"]))
            if trained[side]["features"].get(name) != given[side]["features"].get(name)
        ]
        if diffs:
            raise ValueError(
                f"bundle {bundle.path} was trained on another feature schema than {dataset.path}/schema.json: "
                + "; ".join(diffs[:5]) + ("; ..." if len(diffs) > 5 else "")
            )
    warnings = []
    if bundle.manifest.get("full"):
        warnings.append(
            f"bundle {bundle.path.name} was trained with --full: the test rows were in its training data, "
            "so these metrics are optimistic"
        )
    trained_on = bundle.manifest.get("data_fingerprint")
    if trained_on and trained_on != dataset.fingerprint():
        warnings.append(
            f"bundle {bundle.path.name} was trained on other data than {dataset.path} (data fingerprint differs); "
            "the metrics are not comparable with its manifest's"
        )
    return warnings


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stdout,  # stderr carries only the one-line error (INTERFACES.md §2)
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # the ONNX exporter's optimizer passes
    from training.bundle import BundleError
    from training.schema import DatasetError

    try:
        _run(args)
    except (DatasetError, BundleError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"trainer {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"trainer {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for cron, details with -v
        logging.getLogger("trainer").debug("traceback", exc_info=True)
        print(f"trainer {args.cmd}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
