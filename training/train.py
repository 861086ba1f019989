"""`trainer fit`: the training loop, top to bottom.

1. Read and validate the dataset; apply the EVAL.md split (or take every click with --full).
2. Fit the encoders on training data only; encode every user and every catalog item once.
3. Train both towers: each step is batch → forward (`TrainStep`: towers, history pooling, the
   task's loss, SSL) → backward → optimizer step → weight average; after each epoch recall@20
   on the validation split keeps the best weights (early stopping); then (`refit`) train again
   on fit + val for that many epochs.
4. Bake the users' pooled histories into the id table and calibrate the OOV id row that serves
   unseen users (training/cold.py).
5. Evaluate on the test split (not with --full) and write a model bundle atomically.

The objective (loss, logQ, masks, negatives) is `training.task`'s: the loop calls
`RetrievalTask.batch_loss` and nothing else of it. The configuration is `training.config`'s.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from training.alloc import tune_allocator
from training.artifacts import check_output_dir
from training.bundle import save_bundle
from training.cold import calibrate_cold_start
from training.config import ConfigError, TrainConfig
from training.dataset import Dataset, read_dataset
from training.distributed import Ranks, current, rank_batch_size
from training.ema import WeightAverage
from training.evaluate import evaluate_model, history_metrics
from training.features import TowerEncoder
from training.model import (
    HistoryPooling,
    TwoTowerModel,
    UserHistory,
    bake_history,
    build_history,
    history_bags,
)
from training.optim import TableOptimizer, choose_sparse_tables, keep_rows_gradient
from training.samplers import keep_probability, positive_weights, recency_weights
from training.split import Split, id_sort_key, split_interactions
from training.ssl import SSLTask
from training.task import Batch, RetrievalTask, build_task

__all__ = ["ConfigError", "TrainConfig", "TrainStep", "TrainingDiverged", "fit"]

log = logging.getLogger("trainer")


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN / infinite: the run's settings cannot train (no bundle)."""


def batch_bounds(n_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each batch of a pass over `n_rows` rows; a last batch of a single row is
    folded into the one before it (in-batch negatives need another row, and one row is no
    batch statistic), so a pass may end with one batch of batch_size + 1 rows."""
    bounds = [(s, min(s + batch_size, n_rows)) for s in range(0, n_rows, batch_size)]
    if batch_size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n_rows)]
    return bounds


def pick_device(name: str) -> torch.device:
    """The torch device for `name`; a device this machine lacks is a clear error up front
    (torch would otherwise fail with an AssertionError at the first tensor moved there)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise ValueError(f"device={name!r}: this machine has {n} CUDA device(s); use 'auto' or 'cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r}: MPS is not available on this machine; use 'auto' or 'cpu'")
    return dev


def check_models_dir(models_dir: str | Path) -> None:
    """Fail before any data is read or trained on if `models_dir` can never hold a bundle (a
    file, under a file, or not writable); the probe leaves no empty models directory behind."""
    check_output_dir(models_dir, "models directory", probe=True)


def check_finite(model: torch.nn.Module, loss: float, where: str) -> None:
    """Raise TrainingDiverged if `loss` or any weight of `model` is NaN or infinite.

    A diverged run (lr far too high, a temperature near 0) otherwise trains on, and a bundle of
    NaN weights is written with exit 0 and served as garbage; stopping at the first bad epoch
    saves the remaining epochs too.
    """
    if not math.isfinite(loss):
        bad = f"loss is {loss}"
    else:
        names = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if not names:
            return
        bad = f"weights are not finite ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    raise TrainingDiverged(f"training diverged: {bad} {where}; lower lr / check temperature")


def user_table(dataset: Dataset) -> tuple[np.ndarray, pd.DataFrame | None]:
    """Every known user id (users.csv ∪ interactions) and their feature rows, aligned."""
    ids = pd.unique(pd.concat([
        dataset.users["user_id"] if dataset.users is not None else pd.Series(dtype=str),
        dataset.interactions["user_id"],
    ], ignore_index=True))
    if dataset.users is None:
        return ids, None
    feats = dataset.users.set_index("user_id").reindex(pd.Index(ids)).fillna("").reset_index(drop=True)
    return ids, feats


def fit_encoders(dataset: Dataset, train: pd.DataFrame, cfg: TrainConfig) -> tuple[TowerEncoder, TowerEncoder]:
    train_users = pd.unique(train["user_id"])
    users = None
    if dataset.users is not None:
        users = dataset.users[dataset.users["user_id"].isin(train_users)]
    kw = {"min_count": cfg.min_count, "n_buckets": cfg.n_buckets, "max_multi_len": cfg.max_multi_len}
    user_enc = TowerEncoder.fit("user", dataset.schema.user, train["user_id"], users, **kw)
    item_enc = TowerEncoder.fit(
        "item", dataset.schema.item, train["item_id"], dataset.items, popularity=cfg.item_popularity_feature, **kw
    )
    return user_enc, item_enc


@contextlib.contextmanager
def baked_history(model: TwoTowerModel, pool: HistoryPooling | None, history: UserHistory | None, id_codes: torch.Tensor):
    """Temporarily add each user's pooled history into the user id embeddings (evaluation,
    hard-negative mining); the free embeddings are restored afterwards."""
    if pool is None or history is None:
        yield
        return
    weight = model.user_tower.id_emb.weight
    saved = weight.detach().clone()
    bake_history(model.user_tower, id_codes, pool.pooled_all(history))
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@torch.no_grad()
def model_vectors(model: TwoTowerModel, users: dict, items: dict, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Every user's and every catalog item's vector under the current weights (eval mode)."""
    was = model.training
    model.eval()
    out = (
        model.user_tower.embed_encoded(users, chunk).float().cpu().numpy(),
        model.item_tower.embed_encoded(items, chunk).float().cpu().numpy(),
    )
    model.train(was)
    return out


def fit(
    data_dir: str | Path,
    models_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    full: bool = False,
    progress: bool | None = None,
    ranks: Ranks | None = None,
) -> Path:
    """Train a model on `data_dir` and write its bundle under `models_dir`; return the bundle path.

    `ranks` (default: `training.distributed.current()`, one process unless launched by
    torchrun): data-parallel training over W ranks that reproduces one process on the
    concatenated batches; rank 0 validates, bakes, calibrates and writes the bundle, and every
    rank returns its path.

    The glibc allocator keeps freed buffers (`training.alloc`). With `cfg.deterministic` (the
    default) torch's deterministic algorithms are on for the run and restored afterwards: some
    multi-threaded CPU kernels otherwise sum in a varying order, and on ML-100K two runs with
    one seed drifted apart by ±0.004 recall@20 by the end.
    """
    cfg = cfg or TrainConfig()
    check_models_dir(models_dir)
    tune_allocator()
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    # Deterministic mode also fills every torch.empty with NaN, a debugging aid that changes no
    # result (every buffer the trainer reads it has written) and cost ~15 % of a step at 1M items.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        return _fit(data_dir, models_dir, cfg, full=full, progress=progress, ranks=ranks or current())
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


def _fit(
    data_dir: str | Path, models_dir: str | Path, cfg: TrainConfig, *, full: bool, progress: bool | None, ranks: Ranks,
) -> Path:
    t_start = time.time()
    device = pick_device(cfg.device)
    if ranks.world > 1 and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)  # one GPU per rank

    # 1. data ------------------------------------------------------------------------------
    dataset = read_dataset(data_dir)
    split = split_interactions(dataset.interactions)
    clicked = dataset.interactions[dataset.interactions["clicked"].to_numpy()]
    train = clicked if full else split.fit
    if len(train) == 0:
        raise ValueError(f"{data_dir}: no training interactions after the EVAL.md split")
    if not (train["weight"] > 0).any():
        # every row's loss is multiplied by its weight: all zero trains nothing, silently
        raise ValueError(f"{data_dir}: every training interaction has weight 0; nothing to train on")
    log.info("data: %s; training on %d rows (%s)", split.summary(), len(train), "full" if full else "fit split")

    # 2-3. encoders, model, training (early stopping on validation) -------------------------
    run = _train(dataset, split, train, cfg, device, epochs=(cfg.full_epochs or cfg.epochs) if full else cfg.epochs, validate=not full,
                 progress=progress, ranks=ranks)
    if cfg.refit and not full:
        # Validation chose the epoch count; train again from scratch on fit + val for that many
        # epochs, so the model also learns from each user's latest clicks (the val rows): the
        # ones closest in time to what comes next, which `recency_boost` weighs most.
        log.info("refit on the train split (fit + val, %d rows) for %d epochs", len(split.train), run.best_epoch)
        best_epoch, history = run.best_epoch, run.history
        del run  # the first pass's model, tables and optimizer state need not live through the refit
        run = _train(dataset, split, split.train, cfg, device, epochs=best_epoch, validate=False, progress=progress, ranks=ranks)
        run = dataclasses.replace(run, best_epoch=best_epoch, history=history)
    # steps 4-5 on rank 0 (after a barrier); every rank gets the bundle's path or rank 0's error
    ranks.barrier()
    return ranks.on_main(lambda: _finish(dataset, split, clicked, run, cfg, device, models_dir, full=full, t_start=t_start))


def _finish(
    dataset: Dataset, split: Split, clicked: pd.DataFrame, run: _Run, cfg: TrainConfig, device: torch.device,
    models_dir: str | Path, *, full: bool, t_start: float,
) -> Path:
    """Steps 4-5: bake the histories, calibrate the cold-start row, evaluate, save the bundle."""
    model, pool = run.model, run.pool
    model.eval()

    # 4. bake the histories, calibrate the cold-start row --------------------------------------
    known = clicked if full else split.train
    known_u, known_i = run.data.user_index.get_indexer(known["user_id"]), run.data.item_index.get_indexer(known["item_id"])
    if pool is not None:
        # What a request-time history sits next to (HistoryPooling): the OOV row as training
        # left it (the calibration below refits it for features-only users) and, with
        # history_free_id, the free rows before the bake.
        with torch.no_grad():
            pool.cold_id.copy_(model.user_tower.id_emb.weight[0])
            if pool.free_id is not None:
                pool.free_id.copy_(model.user_tower.id_emb.weight)
        # Bake the pooled history into the id embeddings for good: test users are ranked with
        # their most recent clicks in `train` (fit + val), as the EVAL.md baselines are, and a
        # request without a history gets exactly this.
        final = history_of(known, run.data, device)
        bake_history(model.user_tower, run.data.users["id"], pool.pooled_all(final))
    if cfg.cold_calibration_steps:
        # Users unseen in training are served by the OOV id row; fit it to what the cold-start
        # metric measures (every user counts once), leaving every other weight as trained.
        calibrate_cold_start(
            model.user_tower, model.item_tower, run.data.users, run.data.items, known_u, known_i,
            steps=cfg.cold_calibration_steps, temperature=cfg.cold_calibration_temperature,
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    # 5. evaluate and save -----------------------------------------------------------------
    check_finite(model, 0.0, "after history baking / cold-start calibration")
    train_seconds = round(time.time() - t_start, 2)
    metrics = {}
    if not full:  # one embedding of the catalog for both evaluations
        item_vecs = model.embed_items(dataset.items)
        metrics = evaluate_model(model, dataset, split, truth_part="test", item_vecs=item_vecs)
        metrics |= history_metrics(model, dataset, split, item_vecs=item_vecs)
    model.cpu()
    item_counts = {str(i): int(c) for i, c in zip(run.data.item_index, run.data.counts, strict=True) if c > 0}
    path = save_bundle(
        model,
        models_dir,
        train_config=cfg.to_dict(),
        schema=dataset.schema.to_json(),
        item_counts=item_counts,
        data_fingerprint=dataset.fingerprint(),
        metrics=metrics,
        full=full,
        extra={"train_seconds": train_seconds, "best_epoch": run.best_epoch, "history": run.history, "split": split.summary()},
    )
    log.info("metrics %s; trained in %.1fs; bundle %s", metrics, train_seconds, path)
    return path


@dataclass
class _Run:
    """What one training pass leaves behind (the model, its history pooling and tables)."""

    model: TwoTowerModel
    pool: HistoryPooling | None
    data: TrainingData
    history: list[dict]           # per-epoch loss (and validation metrics)
    best_epoch: int


def _train(
    dataset: Dataset, split: Split, train: pd.DataFrame, cfg: TrainConfig, device: torch.device,
    *, epochs: int, validate: bool, progress: bool | None, ranks: Ranks,
) -> _Run:
    """One training pass over `train` rows from a fresh, seeded model. With `validate`, recall@20
    on the validation split after each epoch picks the best epoch (its weights are restored)
    and stops after `patience` epochs without improvement; else it trains `epochs` epochs.

    Over W ranks every rank trains the same replica on its slice of each global batch (the
    `cfg.batch_size` rows of one process, W·(batch_size // W) when W does not divide it; the
    last len(train) mod W rows of each epoch's permutation are left out); validation and the
    stop decision are rank 0's, broadcast; the returned model is meaningful on rank 0."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    # 2. encoders, model, the encoded tables ------------------------------------------------
    user_enc, item_enc = fit_encoders(dataset, train, cfg)
    model = TwoTowerModel(cfg.model_config_with_history(), user_enc, item_enc).to(device)
    data = TrainingData.encode(dataset, train, user_enc, item_enc, cfg, device)
    bounds = batch_bounds(len(train) // ranks.world, rank_batch_size(cfg.batch_size, ranks))  # per rank
    if ranks.world > 1:  # different data or config on one rank: a clear error now, not a hang in a collective
        ranks.check_same("the training data and batch plan", {
            "rows": len(train), "users": len(data.user_index), "items": data.n_items, "batches": len(bounds),
            "clicks": int(data.counts.sum()), "fingerprint": dataset.fingerprint(), "config": repr(cfg.to_dict()),
        })
    pool = model.user_history  # user id vector = free embedding + pooled clicks before the row (causal)
    if pool is not None and not cfg.history_free_id:  # known users are their history alone; only the OOV row learns
        freeze_known_user_ids(model)
    gen = torch.Generator().manual_seed(cfg.seed)  # negatives / keep-probability / SSL draws (CPU)
    task = build_task(cfg, data.counts, data.pos_keys, gen, device, ranks=ranks)
    ssl = None
    if cfg.ssl_weight > 0:
        ssl = SSLTask(data.items, augmentation=cfg.ssl_augmentation, rate=cfg.ssl_rate, batch_size=cfg.ssl_batch_size,
                      temperature=cfg.ssl_temperature)
    step = TrainStep(model, pool, task, data, cfg, gen, ssl)
    params = list(step.parameters())
    # the catalog-sized tables get sparse gradients + SparseAdam, and a lazy average (optim.py)
    tables = [model.user_tower.id_emb, model.item_tower.id_emb] + ([pool.emb] if pool is not None else [])
    sparse = choose_sparse_tables(tables, cfg.sparse_tables, cfg.weight_decay)
    opt = TableOptimizer(params, sparse, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = WeightAverage(params, cfg.ema_decay, lazy=opt.sparse_params) if cfg.ema_decay else None
    runner = ranks.wrap(step, opt.sparse_params)  # DDP over the dense parameters (the step itself in one process)
    if sparse:
        log.info("sparse tables: %s", ", ".join(f"{t.num_embeddings:,} x {t.embedding_dim}" for t in sparse))

    def snapshot() -> tuple[dict, dict | None]:
        return copy.deepcopy(model.state_dict()), copy.deepcopy(pool.state_dict()) if pool is not None else None

    # 3. train: batch → forward → loss → backward → step → EMA, then evaluate -----------------
    best: tuple[tuple[float, float], int, tuple[dict, dict | None]] = ((-math.inf, -math.inf), 0, snapshot())
    history = []
    for epoch in range(1, epochs + 1):
        step.train()
        task.start_epoch(lambda: epoch_vectors(model, pool, data))
        perm = torch.from_numpy(rng.permutation(len(train))).to(device)
        hide = (None if progress is None else not progress) if ranks.is_main else True
        bar = tqdm(bounds, desc=f"epoch {epoch}/{epochs}", disable=hide, leave=False, file=sys.stderr)
        total = 0.0
        for b, (lo, hi) in enumerate(bar):
            loss = runner(ranks.batch_rows(perm, lo, hi))
            opt.zero_grad()
            loss.backward()
            ranks.sync_sparse_grads(opt.sparse_params)
            if ema is not None:
                ema.before_step()  # lazy rows catch up before the optimizer moves them
            opt.step()
            if ema is not None:
                ema.update()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                bar.close()
                check_finite(model, loss_value, f"at epoch {epoch}")
            total += loss_value
            if b % 10 == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}")
        bar.close()
        total = float(ranks.sum(torch.tensor(total, dtype=torch.float64))) / ranks.world  # the global batches' mean loss
        check_finite(model, total, f"at epoch {epoch}")
        if pool is not None:
            check_finite(pool, total, f"at epoch {epoch}")
        row = {"epoch": epoch, "loss": round(total / len(bounds), 5)}

        def validation(row: dict = row, epoch: int = epoch) -> tuple[dict, int]:
            """Rank 0: the epoch's validation metrics and the best epoch so far."""
            nonlocal best
            model.eval()
            with ema.swapped() if ema is not None else contextlib.nullcontext():  # validate the average
                with baked_history(model, pool, data.history, data.users["id"]):
                    # the catalog is already encoded: embed it from there, not from the frame again
                    item_vecs = model.item_tower.embed_encoded(data.items).float().cpu().numpy()
                    val = evaluate_model(model, dataset, split, truth_part="val", item_vecs=item_vecs,
                                         max_users=cfg.eval_max_users, seed=cfg.seed)
                row |= {"val_recall@20": val.get("recall@20", 0.0), "val_ndcg@20": val.get("ndcg@20", 0.0)}
                # ndcg@20 breaks ties: on a catalog of <= 20 items recall@20 is 1 at every epoch,
                # and the strict > alone kept epoch 1 however much later epochs ranked better
                key = (row["val_recall@20"], row["val_ndcg@20"])
                if key > best[0]:
                    best = (key, epoch, snapshot())
            return row, best[1]

        best_epoch = 0
        if validate:  # rank 0 decides, every rank follows (a rank that stopped alone would hang the others)
            row, best_epoch = ranks.on_main(validation)
        history.append(row)
        log.info("epoch %s", row)
        if validate and epoch - best_epoch >= cfg.patience:
            break
    if validate:
        model.load_state_dict(best[2][0])
        if pool is not None:
            pool.load_state_dict(best[2][1])
    elif ema is not None:
        ema.copy_to_params()
    return _Run(model, pool, data, history, best_epoch if validate else epochs)


@dataclass
class TrainingData:
    """What one training pass reads, encoded once and moved to the device.

    Row r of the training interactions is the pair (`pair_users[r]`, `pair_items[r]`) of
    user-table and catalog rows, with interaction weight `weights[r]` and, with `recency_boost`,
    the recency factor `recency[r]`. `counts` are training clicks per catalog row (the logQ
    input), `pos_keys` the sorted `user * n_items + item` of every training positive (masks).
    """

    user_index: pd.Index             # user-table rows (users.csv ∪ interaction users)
    item_index: pd.Index             # catalog rows
    users: dict[str, torch.Tensor]   # encoded user table ("id": vocabulary code of each row)
    items: dict[str, torch.Tensor]   # encoded catalog
    pair_users: torch.Tensor
    pair_items: torch.Tensor
    weights: torch.Tensor
    recency: torch.Tensor | None
    counts: np.ndarray
    pos_keys: torch.Tensor
    history: UserHistory | None      # with user_history: each user's clicks in EVAL.md order (row r: position[r])

    @property
    def n_items(self) -> int:
        return len(self.item_index)

    @classmethod
    def encode(
        cls, dataset: Dataset, train: pd.DataFrame, user_enc: TowerEncoder, item_enc: TowerEncoder,
        cfg: TrainConfig, device: torch.device,
    ) -> TrainingData:
        user_ids, user_feats = user_table(dataset)
        user_index, item_index = pd.Index(user_ids), pd.Index(dataset.items["item_id"])
        users = _to_device(user_enc.encode_table(user_ids, user_feats), device)
        items = _to_device(item_enc.encode_table(item_index.to_numpy(), dataset.items), device)
        pair_u = user_index.get_indexer(train["user_id"])
        pair_i = item_index.get_indexer(train["item_id"])
        weights = torch.from_numpy(train["weight"].to_numpy(np.float32, copy=True)).to(device)
        recency = None
        if cfg.recency_boost:
            recency = torch.from_numpy(recency_weights(pair_u, train["timestamp"].to_numpy(), cfg.recency_boost)).float().to(device)
        n_items = len(item_index)
        counts = np.bincount(pair_i, minlength=n_items).astype(np.float64)
        pos_keys = torch.from_numpy(np.unique(pair_u.astype(np.int64) * n_items + pair_i)).to(device)
        data = cls(user_index, item_index, users, items, torch.from_numpy(pair_u).to(device),
                   torch.from_numpy(pair_i).to(device), weights, recency, counts, pos_keys, None)
        if cfg.user_history:
            data.history = history_of(train, data, device)
        return data


def history_of(clicks: pd.DataFrame, data: TrainingData, device: torch.device) -> UserHistory:
    """The click sequences of `clicks` (user_id, item_id, timestamp rows) over `data`'s user
    table, as history-table rows (item id codes), in EVAL.md order: timestamp, then item id."""
    users = data.user_index.get_indexer(clicks["user_id"])
    items = data.items["id"].cpu().numpy()[data.item_index.get_indexer(clicks["item_id"])]
    keys = id_sort_key(clicks["item_id"].reset_index(drop=True)).to_numpy()
    return build_history(users, items, clicks["timestamp"].to_numpy(), len(data.user_index), keys).to(device)


def _to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def _rows(table: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in table.items()}


class TrainStep(nn.Module):
    """The forward of one training step: rows of the training data in, the step's loss out.

    Both towers, the history pooling and the SSL branch run inside this one module's `forward`,
    together with the task's loss (`RetrievalTask.batch_loss`): so every trained parameter is
    this module's, and a data-parallel wrapper around it sees all of their gradients.

    The random draws happen in a fixed order (user id dropout, item id dropout, head
    sub-sampling, negatives, SSL), so a seed gives one model. Over W ranks (`task.ranks`) each
    per-row draw is made for the global batch and sliced to the rank's rows, so the ranks
    together draw what one process draws for the concatenated batch (MLP dropout, when
    `model.dropout` > 0, is drawn per rank: the same distribution, not the same numbers).
    """

    def __init__(
        self, model: TwoTowerModel, pool: HistoryPooling | None, task: RetrievalTask, data: TrainingData,
        cfg: TrainConfig, generator: torch.Generator, ssl: SSLTask | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.pool = pool
        self.task = task
        self.data = data
        self.ssl = ssl
        self.ssl_weight = cfg.ssl_weight
        self.generator = generator
        self.ranks = task.ranks
        self.cold_history_len = cfg.history_cold_max_len
        self.cold_row_weight = cfg.cold_row_weight
        device = data.pair_items.device
        # positive re-weighting (head clicks down, tail up) and head sub-sampling, per catalog row
        self.pos_weights = (
            torch.from_numpy(positive_weights(data.counts, cfg.positive_beta)).float().to(device) if cfg.positive_beta else None
        )
        self.keep_p = torch.from_numpy(keep_probability(data.counts, cfg.positive_keep_t)).float() if cfg.positive_keep_t > 0 else None

    def embed_items(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model.item_tower(_rows(self.data.items, rows))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        d = self.data
        bu, bi = d.pair_users[rows], d.pair_items[rows]
        user_tower, item_tower, ranks = self.model.user_tower, self.model.item_tower, self.ranks
        drop = user_tower.id_drop_mask(ranks.world * len(bu), bu.device)
        drop = None if drop is None else ranks.local(drop)
        offset = self.history_input(rows, bu, drop) if self.pool is not None else None
        u = user_tower(_rows(d.users, bu), offset, drop)
        item_drop = item_tower.id_drop_mask(ranks.world * len(bi), bi.device)
        v = item_tower(_rows(d.items, bi), None, None if item_drop is None else ranks.local(item_drop))
        loss = self.task.batch_loss(Batch(bu, bi, u, v, self.row_weights(rows, bi, drop), drop), self.embed_items)
        if self.ssl is not None:  # L_main + α·L_self over items drawn uniformly from the catalog
            loss = loss + self.ssl_weight * self.ssl.loss(self.model.item_tower, self.generator)
        return loss

    def history_input(self, rows: torch.Tensor, users: torch.Tensor, dropped: torch.Tensor | None) -> torch.Tensor:
        """(n, id_dim) pooled causal history of each training row: only clicks strictly before
        the row (EVAL.md order), so the model never sees its target or a later click, exactly as
        a client's history at request time.

        A row that keeps its user id pools the user's most recent `history_max_len` clicks before
        it (a warm user's serving input). A row whose id is dropped stands for a new user: it
        pools the user's *first* l clicks, l drawn uniformly from 0..min(history_cold_max_len,
        clicks before the row), the EVAL.md cold_mM request (l = 0: features only).
        """
        h, pool = self.data.history, self.pool
        ends = h.position[rows]
        starts = (ends - pool.max_len).clamp(min=0) if pool.max_len is not None else torch.zeros_like(ends)
        if dropped is not None:
            cap = ends.clamp(max=self.cold_history_len)
            draw = self.ranks.local(torch.rand(self.ranks.world * len(rows), generator=self.generator))  # the global batch's draw
            cold_len = (draw.to(cap.device) * (cap + 1).to(torch.float32)).long()
            if pool.max_len is not None:
                cold_len = cold_len.clamp(max=pool.max_len)
            starts = torch.where(dropped, torch.zeros_like(starts), starts)
            ends = torch.where(dropped, cold_len, ends)
        return pool(*history_bags(h, users, starts, ends))

    def row_weights(self, rows: torch.Tensor, items: torch.Tensor, dropped: torch.Tensor | None) -> torch.Tensor:
        """Each row's loss weight: its interaction weight × recency on id-kept rows, or
        `cold_row_weight` on id-dropped ones (new users are judged on all of their clicks, so no
        recency there; the weight sets how much the new-user path counts against the warm one)
        × positive re-weighting × head sub-sampling (dropped rows still serve as in-batch negatives)."""
        d = self.data
        w = d.weights[rows]
        if d.recency is not None:
            w = w * (d.recency[rows] if dropped is None else torch.where(dropped, self.cold_row_weight, d.recency[rows]))
        elif dropped is not None and self.cold_row_weight != 1.0:
            w = w * torch.where(dropped, self.cold_row_weight, 1.0)
        if self.pos_weights is not None:
            w = w * self.pos_weights[items]
        if self.keep_p is not None:
            keep = self.ranks.local(torch.rand(self.ranks.world * len(items), generator=self.generator))
            w = w * (keep < self.keep_p[items.cpu()]).to(w)
        return w


def freeze_known_user_ids(model: TwoTowerModel) -> None:
    """Known users are their history alone: zero their free id rows and keep them at zero (only
    the OOV row, the fallback of unknown users, learns). The gradient hook drops every row but 0,
    so neither dense Adam (zero gradient, zero moments: no move) nor SparseAdam (no entry) moves them."""
    id_w = model.user_tower.id_emb.weight
    with torch.no_grad():
        id_w[1:].zero_()
    keep_rows_gradient(id_w, torch.tensor([0]))  # dense or sparse gradients alike (training/optim.py)


def epoch_vectors(model: TwoTowerModel, pool: HistoryPooling | None, data: TrainingData) -> tuple[np.ndarray, np.ndarray]:
    """The current model's user vectors (histories baked in) and item vectors (hard-negative mining)."""
    with baked_history(model, pool, data.history, data.users["id"]):
        return model_vectors(model, data.users, data.items)
