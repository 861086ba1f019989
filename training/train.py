"""`trainer fit`: the training loop, top to bottom.

1. Read and validate the dataset; apply the EVAL.md split (or take every click with --full).
2. Fit the encoders on training data only; encode every user and every catalog item once.
3. Train both towers with the configured retrieval task, evaluating recall@20 on the
   validation split after each epoch and keeping the best weights (early stopping); then
   (`refit`) train again on fit + val for that many epochs.
4. Bake the users' pooled histories into the id table and calibrate the OOV id row that serves
   unseen users (training/cold.py).
5. Evaluate on the test split (not with --full) and write a model bundle atomically.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from training.artifacts import check_output_dir
from training.bundle import save_bundle
from training.cold import calibrate_cold_start
from training.dataset import Dataset, first_invalid_utf8, read_dataset
from training.ema import WeightAverage
from training.evaluate import evaluate_model
from training.features import TowerEncoder
from training.frequency import StreamingFrequencyEstimator
from training.model import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    RATE,
    HistoryPooling,
    ModelConfig,
    Rule,
    TwoTowerModel,
    UserHistory,
    bake_history,
    build_history,
    check_config_fields,
)
from training.samplers import (
    SAMPLERS,
    NegativeSampler,
    build_sampler,
    keep_probability,
    positive_weights,
    recency_weights,
)
from training.split import Split, split_interactions
from training.ssl import AUGMENTATIONS, SSLTask
from training.task import (
    OBJECTIVES,
    RetrievalTask,
    known_positive_mask,
    mixed_log_q,
    sampled_hit_mask,
)

log = logging.getLogger("trainer")

# Mixed negative sampling (Yang et al. 2020) with the in-batch softmax: uniform catalog items
# added to every step's candidates. In-batch negatives are drawn by clicks, so rarely-clicked
# items almost never appear as negatives; the uniform ones reach them. Chosen on the nested
# validation (docs/results/ml100k.md): tail_recall@100 +0.017, recall@20 +0.004 over 3 seeds.
DEFAULT_MIXED_NEGATIVES = 1024

DEVICE_TYPES = ("cpu", "cuda", "mps")


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN / infinite: the run's settings cannot train (no bundle)."""


def _one_of(choices: tuple[str, ...]) -> Rule:
    return (lambda v: v in choices, f"one of {list(choices)}")


def _device_ok(name: str) -> bool:
    if name == "auto":
        return True
    try:
        return torch.device(name).type in DEVICE_TYPES
    except (RuntimeError, ValueError):
        return False


# Range rules of TrainConfig fields (types are checked from the annotations). Each guards a
# value that either crashes late (batch_size 0: ZeroDivisionError after the data is read) or
# trains silently wrong (epochs 0: an untrained bundle; lr 0: the initial weights).
TRAIN_RULES: dict[str, Rule] = {
    "seed": NON_NEGATIVE, "epochs": AT_LEAST_1, "patience": AT_LEAST_1, "full_epochs": AT_LEAST_1,
    "batch_size": AT_LEAST_1, "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "ema_decay": RATE,
    "logq_weight": NON_NEGATIVE, "cold_logq_weight": NON_NEGATIVE, "mixed_negatives": NON_NEGATIVE,
    "min_count": NON_NEGATIVE, "n_buckets": AT_LEAST_1, "max_multi_len": AT_LEAST_1,
    "eval_max_users": AT_LEAST_1, "history_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"), "history_max_len": AT_LEAST_1,
    "device": (_device_ok, f"'auto' or a torch device of type {list(DEVICE_TYPES)} (e.g. 'cpu', 'cuda:0')"),
    "cold_calibration_steps": NON_NEGATIVE, "cold_calibration_temperature": POSITIVE,
    "objective": _one_of(OBJECTIVES), "num_negatives": AT_LEAST_1, "negative_sampler": _one_of(SAMPLERS),
    "popularity_alpha": NON_NEGATIVE,
    "hard_rank_band": (lambda v: len(v) == 2 and 0 <= v[0] < v[1], "[lo, hi] with 0 <= lo < hi"),
    "mixture_hard_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "mixture_easy": _one_of(("uniform", "popularity", "in_batch")), "triplet_margin": NON_NEGATIVE,
    "logistic_sigma": POSITIVE, "frequency": _one_of(("exact", "streaming")), "stream_buckets": AT_LEAST_1,
    "stream_hashes": AT_LEAST_1, "stream_alpha": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "positive_beta": NON_NEGATIVE, "recency_boost": NON_NEGATIVE, "positive_keep_t": NON_NEGATIVE,
    "ssl_weight": NON_NEGATIVE, "ssl_augmentation": _one_of(AUGMENTATIONS), "ssl_rate": RATE,
    "ssl_batch_size": AT_LEAST_1, "ssl_temperature": POSITIVE,
}


@dataclass
class TrainConfig:
    """Training hyper-parameters; a JSON file passed with --config overrides any of them."""

    seed: int = 0
    epochs: int = 40                 # maximum epochs (early stopping usually ends sooner)
    patience: int = 4                # epochs without validation improvement before stopping
    full_epochs: int | None = 10     # epochs for --full (no validation split to stop on); None: `epochs`
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.99          # validate and keep an exponential moving average of the weights (0 = off)
    logq: bool = True
    logq_weight: float = 1.0
    cold_logq_weight: float | None = 3.0  # logQ weight of rows whose user id was dropped (None: logq_weight)
    mask_user_positives: bool = True  # also mask in-batch items the user clicked elsewhere
    mixed_negatives: int | None = None  # in-batch softmax: + this many uniform catalog negatives per step (MNS);
                                        # None: min(1024, catalog size) with the in-batch softmax, 0 with sampled objectives
    min_count: int = 2               # rarer categorical values share the OOV row (as unseen ones do at serving)
    n_buckets: int = 10
    max_multi_len: int = 16
    item_popularity_feature: bool = False  # item tower input: log1p(training clicks); 0 for fresh items
    eval_max_users: int | None = 5000  # validation users sampled per epoch (big datasets)
    user_history: bool = True        # user id vector += pooled embeddings of the user's clicked items
    history_alpha: float = 1.0       # pooled = sum / n^alpha (1: mean, 0.5: FISM's usual choice)
    history_max_len: int | None = None  # keep each user's most recent items only
    history_free_id: bool = False    # with user_history: also learn a free per-user embedding
    device: str = "auto"
    deterministic: bool = True       # torch deterministic algorithms during fit (same seed, same model)
    refit: bool = True               # after early stopping: retrain on fit + val for the chosen epoch count
    cold_calibration_steps: int = 300     # after training: fit the OOV id row, each user counting once (0 = off)
    cold_calibration_temperature: float = 0.2  # its softmax temperature (chosen on pseudo-cold users, docs/results)
    model: ModelConfig = field(default_factory=ModelConfig)
    # objective, negatives, positives, SSL (training/task.py, samplers.py, frequency.py, ssl.py)
    objective: str = "in_batch_softmax"  # | pointwise | triplet_hinge | triplet_logistic | listwise
    num_negatives: int = 3               # sampled negatives per positive (pointwise: the 1:3 ratio)
    negative_sampler: str = "popularity"  # sampled objectives: uniform | popularity | in_batch | hard | mixture
    popularity_alpha: float = 0.75       # popularity sampler: q ∝ clicks^α
    hard_rank_band: list[int] = field(default_factory=lambda: [20, 100])  # model ranks [lo, hi) mined per epoch
    mixture_hard_fraction: float = 0.5   # mixture: share of hard negatives, rest from `mixture_easy`
    mixture_easy: str = "popularity"
    triplet_margin: float = 0.2          # triplet_hinge margin m
    logistic_sigma: float = 10.0         # triplet_logistic scale σ
    frequency: str = "exact"             # in-batch logQ from exact counts | "streaming" (Yi et al. 2019)
    stream_buckets: int = 1 << 16
    stream_hashes: int = 2
    stream_alpha: float = 0.01
    positive_beta: float = 0.0           # positive re-weighting ∝ count^−β (0 = off)
    recency_boost: float = 10.0          # row weight 1 + boost·(position in the user's clicks by time, 0..1); id-kept rows
    positive_keep_t: float = 0.0         # head sub-sampling: keep a click w.p. min(1, sqrt(t/f)) (0 = off)
    ssl_weight: float = 0.0              # α of L_main + α·L_self (0 = no SSL)
    ssl_augmentation: str = "correlated"  # random | multi_dropout | complementary | correlated
    ssl_rate: float = 0.5                # masking / token-dropout probability (random, multi_dropout)
    ssl_batch_size: int = 256            # m items drawn uniformly from the catalog per step
    ssl_temperature: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad key, its value and what is expected."""
        check_config_fields(self, TRAIN_RULES)
        self.model.validate()
        # fields that only mean something together: a value the run would silently ignore, or
        # one that fails only deep inside training, is an error here
        sampled = self.objective != "in_batch_softmax"
        batch_negatives = self.negative_sampler == "in_batch" or (
            self.negative_sampler == "mixture" and self.mixture_easy == "in_batch"
        )
        if sampled and batch_negatives and self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size}: in-batch negatives need batches of >= 2 rows")
        if sampled and self.frequency == "streaming":
            raise ValueError(
                f"frequency='streaming' estimates the in-batch softmax's logQ; objective {self.objective!r} "
                "takes its logQ from its sampler's own distribution (leave frequency 'exact')"
            )
        if self.mixed_negatives and sampled:
            raise ValueError(
                f"mixed_negatives={self.mixed_negatives}: applies to objective 'in_batch_softmax' only "
                f"({self.objective!r} takes its negatives from negative_sampler)"
            )
        if self.history_free_id and not self.user_history:
            raise ValueError("history_free_id=true only applies with user_history=true")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"training config must be an object, got {type(d).__name__}")
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config key(s) {sorted(unknown)}; known: {sorted(known)}")
        model = ModelConfig.from_dict(d.pop("model", {}))
        return cls(model=model, **d)

    @classmethod
    def from_file(cls, path: str | Path | None) -> TrainConfig:
        if path is None:
            return cls()
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            line, byte = first_invalid_utf8(Path(path)) or (0, 0)
            raise ValueError(f"config {path}: not valid UTF-8: byte 0x{byte:02x} at line {line} ({e.reason})") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"config {path}: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"config {path}: top level must be a JSON object")
        try:
            return cls.from_dict(obj)
        except ValueError as e:
            raise ValueError(f"config {path}: {e}") from None


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
def refresh_sampler(sampler: NegativeSampler, model: TwoTowerModel, users: dict, items: dict, chunk: int = 8192) -> None:
    """Give the sampler the current model's user and item vectors (hard-negative mining)."""
    was = model.training
    model.eval()
    sampler.refresh(
        model.user_tower.embed_encoded(users, chunk).float().cpu().numpy(),
        model.item_tower.embed_encoded(items, chunk).float().cpu().numpy(),
    )
    model.train(was)


def fit(
    data_dir: str | Path,
    models_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    full: bool = False,
    progress: bool | None = None,
) -> Path:
    """Train a model on `data_dir` and write its bundle under `models_dir`; return the bundle path.

    With `cfg.deterministic` (the default) torch's deterministic algorithms are on for the run
    and restored afterwards: some multi-threaded CPU kernels otherwise sum in a varying order,
    and on ML-100K two runs with one seed drifted apart by ±0.004 recall@20 by the end.
    """
    cfg = cfg or TrainConfig()
    cfg.validate()  # again: fields may have been assigned after construction
    check_models_dir(models_dir)
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    try:
        return _fit(data_dir, models_dir, cfg, full=full, progress=progress)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


def _fit(data_dir: str | Path, models_dir: str | Path, cfg: TrainConfig, *, full: bool, progress: bool | None) -> Path:
    t_start = time.time()
    device = pick_device(cfg.device)

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
    run = _train(dataset, split, train, cfg, device, epochs=(cfg.full_epochs or cfg.epochs) if full else cfg.epochs, validate=not full, progress=progress)
    if cfg.refit and not full:
        # Validation chose the epoch count; train again from scratch on fit + val for that many
        # epochs, so the model also learns from each user's latest clicks (the val rows): the
        # ones closest in time to what comes next, which `recency_boost` weighs most.
        log.info("refit on the train split (fit + val, %d rows) for %d epochs", len(split.train), run.best_epoch)
        first = run
        run = _train(dataset, split, split.train, cfg, device, epochs=first.best_epoch, validate=False, progress=progress)
        run = dataclasses.replace(run, best_epoch=first.best_epoch, history=first.history)
    model, pool = run.model, run.pool
    model.eval()

    # 4. bake the histories, calibrate the cold-start row --------------------------------------
    known = clicked if full else split.train
    known_u, known_i = run.user_index.get_indexer(known["user_id"]), run.item_index.get_indexer(known["item_id"])
    if pool is not None:
        # Bake the pooled history into the id embeddings for good: test users are ranked with
        # everything they clicked in `train` (fit + val), as the EVAL.md baselines are.
        final = build_history(
            known_u, known_i, known["timestamp"].to_numpy(), len(run.user_index), len(run.item_index), cfg.history_max_len,
        ).to(device)
        bake_history(model.user_tower, run.users["id"], pool.pooled_all(final))
    if cfg.cold_calibration_steps:
        # Users unseen in training are served by the OOV id row; fit it to what the cold-start
        # metric measures (every user counts once), leaving every other weight as trained.
        calibrate_cold_start(
            model.user_tower, model.item_tower, run.users, run.items, known_u, known_i,
            steps=cfg.cold_calibration_steps, temperature=cfg.cold_calibration_temperature,
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    # 5. evaluate and save -----------------------------------------------------------------
    check_finite(model, 0.0, "after history baking / cold-start calibration")
    train_seconds = round(time.time() - t_start, 2)
    metrics = {} if full else evaluate_model(model, dataset, split, truth_part="test")
    model.cpu()
    item_counts = {str(i): int(c) for i, c in zip(run.item_index, run.counts, strict=True) if c > 0}
    path = save_bundle(
        model,
        models_dir,
        train_config=asdict(cfg),
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
    user_index: pd.Index          # trainer user-table rows
    item_index: pd.Index          # catalog rows
    users: dict[str, torch.Tensor]  # encoded user table ("id": vocabulary code of each row)
    items: dict[str, torch.Tensor]  # encoded catalog
    counts: np.ndarray            # training clicks per catalog row (the logQ input)
    history: list[dict]           # per-epoch loss (and validation metrics)
    best_epoch: int


def _train(
    dataset: Dataset, split: Split, train: pd.DataFrame, cfg: TrainConfig, device: torch.device,
    *, epochs: int, validate: bool, progress: bool | None,
) -> _Run:
    """One training pass over `train` rows from a fresh, seeded model. With `validate`, recall@20
    on the validation split after each epoch picks the best epoch (its weights are restored)
    and stops after `patience` epochs without improvement; else it trains `epochs` epochs."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    user_enc, item_enc = fit_encoders(dataset, train, cfg)
    model = TwoTowerModel(cfg.model, user_enc, item_enc).to(device)
    user_ids, user_feats = user_table(dataset)
    user_index, item_index = pd.Index(user_ids), pd.Index(dataset.items["item_id"])
    users_t = {k: torch.from_numpy(v).to(device) for k, v in user_enc.encode_table(user_ids, user_feats).items()}
    items_t = {k: torch.from_numpy(v).to(device) for k, v in item_enc.encode_table(item_index.to_numpy(), dataset.items).items()}
    pair_u = user_index.get_indexer(train["user_id"])
    pair_i = item_index.get_indexer(train["item_id"])
    weights = torch.from_numpy(train["weight"].to_numpy(np.float32, copy=True)).to(device)
    recency = None
    if cfg.recency_boost:
        recency = torch.from_numpy(recency_weights(pair_u, train["timestamp"].to_numpy(), cfg.recency_boost)).float().to(device)
    n_items = len(item_index)
    counts = np.bincount(pair_i, minlength=n_items).astype(np.float64)
    log_q_all = torch.from_numpy(np.log(np.maximum(counts, 1.0) / counts.sum())).float().to(device)
    pos_keys = torch.from_numpy(np.unique(pair_u.astype(np.int64) * n_items + pair_i)).to(device)
    pair_u_t, pair_i_t = torch.from_numpy(pair_u).to(device), torch.from_numpy(pair_i).to(device)
    pool, user_hist = None, None
    if cfg.user_history:  # user id vector = free embedding + pooled clicked items (leave-one-out)
        user_hist = build_history(pair_u, pair_i, train["timestamp"].to_numpy(), len(user_index), n_items, cfg.history_max_len).to(device)
        pool = HistoryPooling(n_items, cfg.model.id_dim, cfg.history_alpha).to(device)
        if not cfg.history_free_id:  # known users are their history alone; only the OOV row learns
            id_w = model.user_tower.id_emb.weight
            with torch.no_grad():
                id_w[1:].zero_()
            keep_oov = torch.zeros_like(id_w[:, :1])
            keep_oov[0] = 1.0
            id_w.register_hook(lambda g: g * keep_oov)

    # 3. train -------------------------------------------------------------------------------
    task = RetrievalTask(
        temperature=cfg.model.temperature, logq=cfg.logq, logq_weight=cfg.logq_weight,
        objective=cfg.objective, margin=cfg.triplet_margin, sigma=cfg.logistic_sigma,
        cold_logq_weight=cfg.cold_logq_weight,
    )
    gen = torch.Generator().manual_seed(cfg.seed)  # sampler/SSL/re-sampling randomness (CPU)
    sampler = None
    if task.uses_sampled_negatives:
        sampler = build_sampler(
            cfg.negative_sampler, counts=counts, pos_keys=pos_keys.cpu().numpy(), log_q_items=log_q_all,
            alpha=cfg.popularity_alpha, rank_band=tuple(cfg.hard_rank_band),
            hard_fraction=cfg.mixture_hard_fraction, easy=cfg.mixture_easy,
        )
    n_mixed = cfg.mixed_negatives
    if n_mixed is None:  # the default: MNS with the in-batch softmax (chosen on the nested validation)
        n_mixed = 0 if task.uses_sampled_negatives else min(DEFAULT_MIXED_NEGATIVES, n_items)
    stream = None
    if cfg.frequency == "streaming":
        stream = StreamingFrequencyEstimator(cfg.stream_buckets, cfg.stream_hashes, cfg.stream_alpha, seed=cfg.seed)
    pos_w = torch.from_numpy(positive_weights(counts, cfg.positive_beta)).float().to(device) if cfg.positive_beta else None
    keep_p = torch.from_numpy(keep_probability(counts, cfg.positive_keep_t)).float() if cfg.positive_keep_t > 0 else None
    ssl = None
    if cfg.ssl_weight > 0:
        ssl = SSLTask(items_t, augmentation=cfg.ssl_augmentation, rate=cfg.ssl_rate, batch_size=cfg.ssl_batch_size, temperature=cfg.ssl_temperature)
    params = list(model.parameters()) + (list(pool.parameters()) if pool is not None else [])
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = WeightAverage(params, cfg.ema_decay) if cfg.ema_decay else None
    def snapshot() -> tuple[dict, dict | None]:
        return copy.deepcopy(model.state_dict()), copy.deepcopy(pool.state_dict()) if pool is not None else None
    best: tuple[tuple[float, float], int, tuple[dict, dict | None]] = ((-math.inf, -math.inf), 0, snapshot())
    history = []
    bounds = batch_bounds(len(train), cfg.batch_size)
    n_batches = len(bounds)
    for epoch in range(1, epochs + 1):
        model.train()
        if sampler is not None:
            with baked_history(model, pool, user_hist, users_t["id"]):
                refresh_sampler(sampler, model, users_t, items_t)
        perm = torch.from_numpy(rng.permutation(len(train))).to(device)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{epochs}", disable=None if progress is None else not progress, leave=False, file=sys.stderr)
        total = 0.0
        for b in bar:
            idx = perm[bounds[b][0] : bounds[b][1]]
            bu, bi = pair_u_t[idx], pair_i_t[idx]
            drop = model.user_tower.id_drop_mask(len(bu), device)
            u = model.user_tower({k: v[bu] for k, v in users_t.items()}, pool(user_hist, bu, bi) if pool is not None else None, drop)
            v = model.item_tower({k: v[bi] for k, v in items_t.items()})
            w = weights[idx]
            if recency is not None:  # recent clicks weigh more on the id path; cold users are judged on all of theirs
                w = w * (recency[idx] if drop is None else torch.where(drop, 1.0, recency[idx]))
            if pos_w is not None:  # positive re-weighting: head clicks down, tail clicks up
                w = w * pos_w[bi]
            if keep_p is not None:  # head sub-sampling; dropped rows still serve as in-batch negatives
                w = w * (torch.rand(len(bi), generator=gen) < keep_p[bi.cpu()]).to(w)
            if not task.uses_sampled_negatives:  # in-batch softmax, logQ ∝ clicks (exact or streamed)
                # + M uniform catalog items shared by the batch (MNS); the user's other clicks are
                # masked among the in-batch and the uniform candidates in one lookup
                neg = torch.randint(n_items, (n_mixed,), generator=gen).to(device) if n_mixed else None
                cands = bi if neg is None else torch.cat([bi, neg])
                known = known_positive_mask(bu, cands, pos_keys, n_items) if cfg.mask_user_positives else None
                extra = None if known is None else known[:, : len(bi)]
                lq = log_q_all[bi]
                if stream is not None:
                    stream.update(bi.cpu().numpy())
                    lq = torch.from_numpy(stream.log_q(bi.cpu().numpy(), len(bi))).float().to(device)
                mns = {}
                if neg is not None:  # logQ of the mixture
                    nlq = log_q_all[neg]
                    if stream is not None:
                        nlq = torch.from_numpy(stream.log_q(neg.cpu().numpy(), len(bi))).float().to(device)
                    lq, nlq = (mixed_log_q(x, len(bi), n_mixed, n_items) for x in (lq, nlq))
                    mns = {
                        "neg_item": model.item_tower({k: t[neg] for k, t in items_t.items()}), "neg_ids": neg, "neg_log_q": nlq,
                        "neg_mask": None if known is None else known[:, len(bi) :],
                    }
                loss = task(u, v, bi, lq, extra_mask=extra, weights=w, id_dropped=drop, **mns)
            else:  # K sampled negatives per row, each with the log q of the sampler that drew it
                neg, neg_lq = sampler.sample(bu, bi, cfg.num_negatives, gen)
                # The item tower runs once per distinct negative: B·K draws from a small catalog
                # repeat items many times (ML-100K: 20,480 draws, at most 1,682 items).
                uniq, inv = torch.unique(neg.reshape(-1), return_inverse=True)
                vn = model.item_tower({k: t[uniq] for k, t in items_t.items()})[inv].view(*neg.shape, -1)
                hits = sampled_hit_mask(bi, neg, bu if cfg.mask_user_positives else None, pos_keys, n_items)
                loss = task.sampled(u, v, vn, neg_log_q=neg_lq, neg_mask=hits, weights=w)
            if ssl is not None:  # L_main + α·L_self over items drawn uniformly from the catalog
                loss = loss + cfg.ssl_weight * ssl.loss(model.item_tower, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
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
        check_finite(model, total, f"at epoch {epoch}")
        if pool is not None:
            check_finite(pool, total, f"at epoch {epoch}")
        row = {"epoch": epoch, "loss": round(total / n_batches, 5)}
        if validate:
            model.eval()
            with ema.swapped() if ema is not None else contextlib.nullcontext():  # validate the average
                with baked_history(model, pool, user_hist, users_t["id"]):
                    val = evaluate_model(model, dataset, split, truth_part="val", max_users=cfg.eval_max_users, seed=cfg.seed)
                row |= {"val_recall@20": val.get("recall@20", 0.0), "val_ndcg@20": val.get("ndcg@20", 0.0)}
                # ndcg@20 breaks ties: on a catalog of <= 20 items recall@20 is 1 at every epoch,
                # and the strict > alone kept epoch 1 however much later epochs ranked better
                key = (row["val_recall@20"], row["val_ndcg@20"])
                if key > best[0]:
                    best = (key, epoch, snapshot())
        history.append(row)
        log.info("epoch %s", row)
        if validate and epoch - best[1] >= cfg.patience:
            break
    if validate:
        model.load_state_dict(best[2][0])
        if pool is not None:
            pool.load_state_dict(best[2][1])
    elif ema is not None:
        ema.copy_to_params()
    return _Run(model, pool, user_index, item_index, users_t, items_t, counts, history, best[1] if validate else epochs)
