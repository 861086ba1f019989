"""bench/experiments.py: decile math by hand, config merging, and the driver end to end on the
tiny synthetic dataset (JSON + report written, cache reused, --report-only, prose kept)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import common
from bench import experiments as ex
from tests.conftest import tiny_train_config
from training.config import ModelConfig, TrainConfig
from training.dataset import read_dataset
from training.split import split_interactions

# ---- deciles --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "n_items", "expected"),
    [
        # counts [1, 2, 0, 3, 0, 0, 0, 2, 0, 0]: rank 3, 1, 7 (tie with 1: row order), 0, then the
        # unclicked rows in catalog order; 10 items -> one item per decile, bin = rank
        ([3, 3, 3, 7, 7, 1, 1, 0], 10, [3, 1, 4, 0, 5, 6, 7, 2, 8, 9]),
        # 4 items in 10 bins: ranks 0..3 -> bins r*10//4 = 0, 2, 5, 7 (six bins stay empty)
        ([2, 2, 1], 4, [5, 2, 0, 7]),
    ],
)
def test_popularity_deciles_by_hand(rows: list[int], n_items: int, expected: list[int]) -> None:
    assert ex.popularity_deciles(np.array(rows), n_items).tolist() == expected


@pytest.mark.parametrize("n_items", [10, 25, 1682])
def test_deciles_are_equal_size_and_ordered_by_clicks(n_items: int) -> None:
    rng = np.random.default_rng(n_items)
    rows = rng.integers(0, n_items, 20 * n_items)
    bins = ex.popularity_deciles(rows, n_items)
    sizes = np.bincount(bins, minlength=10)
    assert sizes.sum() == n_items and sizes.max() - sizes.min() <= 1
    counts = np.bincount(rows, minlength=n_items)
    # every item of decile d has at least as many clicks as every item of decile d + 1
    for d in range(9):
        assert counts[bins == d].min() >= counts[bins == d + 1].max()


def test_popularity_deciles_rejects_rows_outside_the_catalog() -> None:
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ex.popularity_deciles(np.array([0, 3]), 3)


@pytest.mark.parametrize(
    ("k", "recall"),
    [
        # user 0: test {1, 3} (bins 2, 7), top [2, 1] hits 1; user 1: test {0, 2} (bins 5, 0), top [0, 3] hits 0
        (2, [0.0, None, 1.0, None, None, 1.0, None, 0.0, None, None]),
        # k = 1: user 0's top-1 [2] misses 1; user 1's top-1 [0] still hits 0
        (1, [0.0, None, 0.0, None, None, 1.0, None, 0.0, None, None]),
    ],
)
def test_recall_by_decile_by_hand(k: int, recall: list) -> None:
    bins = np.array([5, 2, 0, 7])  # the second popularity_deciles case above
    top = np.array([[2, 1], [0, 3], [1, 2]])
    truth = [np.array([1, 3]), np.array([0, 2, 2]), np.array([], dtype=np.int64)]  # duplicate counted once; empty skipped
    out = ex.recall_by_decile(top, truth, bins, k=k)
    assert out["recall"] == recall  # None: empty decile, not a zero recall
    assert out["pairs"] == [1, 0, 1, 0, 0, 1, 0, 1, 0, 0]
    assert sum(out["hits"]) == (2 if k == 2 else 1)
    assert out["items"] == [1, 0, 1, 0, 0, 1, 0, 1, 0, 0]


def test_per_user_recall_by_hand() -> None:
    top = np.array([[0, 1, 2], [3, 4, 5]])
    r = common.per_user_recall(top, [np.array([0, 9]), np.array([], dtype=np.int64)], k=2)
    assert r.tolist() == [0.5]  # users without truth are skipped, as in EVAL.md


# ---- configs --------------------------------------------------------------------------------------


def test_merge_overrides_merges_model_key_wise_and_copies() -> None:
    base = {"lr": 0.003, "hard_rank_band": [20, 100], "model": {"temperature": 0.05, "hidden": [256]}}
    out = common.merge_overrides(base, {"lr": 0.01, "model": {"temperature": 0.1}, "new": 1})
    assert out == {"lr": 0.01, "hard_rank_band": [20, 100], "model": {"temperature": 0.1, "hidden": [256]}, "new": 1}
    out["model"]["hidden"].append(1)
    assert base["model"] == {"temperature": 0.05, "hidden": [256]}  # base untouched


def test_resolve_config_applies_overrides_on_the_default() -> None:
    cfg = ex.resolve_config(ex.Variant("t", "temperature", {"model": {"temperature": 0.1}, "logq": False}))
    assert cfg.model.temperature == 0.1 and cfg.logq is False
    assert cfg.model.embedding_dim == ModelConfig().embedding_dim  # the rest of `model` is the default's
    assert cfg.objective == TrainConfig().objective
    cfg = ex.resolve_config(ex.Variant("t", "f", {"model": {"hidden": [8]}}), base={"epochs": 3}, epochs=1)
    assert (cfg.epochs, cfg.model.hidden) == (1, [8])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"no_such_field": 1}, r"variant 'bad'.*no_such_field"),
        ({"model": {"no_such_width": 1}}, r"variant 'bad'.*no_such_width"),
        ({"model": 0.1}, r"variant 'bad': model: expected an object"),
    ],
)
def test_bad_override_raises_a_clear_error(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ex.resolve_config(ex.Variant("bad", "f", overrides))


def test_builtin_variants_resolve_against_the_current_trainconfig() -> None:
    names = [v.name for v in ex.VARIANTS]
    assert len(names) == len(set(names))
    cfgs = {v.name: ex.resolve_config(v) for v in ex.VARIANTS}
    assert ex.config_hash(cfgs["default"]) == ex.config_hash(TrainConfig())
    # identical configs share one cache key, so the matrix trains them once
    assert ex.config_hash(cfgs["listwise"]) == ex.config_hash(cfgs["listwise_popularity"])
    # every other variant differs from the default and from each other
    assert len({ex.config_hash(c) for c in cfgs.values()}) == len(cfgs) - 1
    assert {v.family for v in ex.VARIANTS} >= {"objective", "logq", "sampler", "ssl", "temperature", "recency"}
    assert set(ex.TAIL_PANEL) <= set(names)


def test_variants_file_adds_and_replaces(tmp_path: Path) -> None:
    f = tmp_path / "v.json"
    f.write_text(json.dumps([{"name": "default", "overrides": {"lr": 0.01}}, {"name": "mine", "family": "lr", "overrides": {"lr": 0.1}}]))
    vs = ex.combine_variants(ex.VARIANTS, ex.load_variants_file(f))
    assert vs[0].overrides == {"lr": 0.01} and vs[0].family == "custom"
    assert vs[-1] == ex.Variant("mine", "lr", {"lr": 0.1}, "")
    assert len(vs) == len(ex.VARIANTS) + 1
    f.write_text(json.dumps([{"name": "x", "overides": {}}]))
    with pytest.raises(ValueError, match="overides"):
        ex.load_variants_file(f)
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['nope'\]"):
        ex.select_variants(vs, "default,nope")


# ---- choices and targets (validation only) --------------------------------------------------------


def _entry(name: str, family: str, val: float, seconds: float = 10.0, **metrics: float) -> dict:
    return {"name": name, "family": family, "val_recall@20": val, "metrics": metrics, "train_seconds": seconds}


def test_choices_use_validation_and_default_wins_ties() -> None:
    entries = [
        _entry("default", "default", 0.20, **{"recall@20": 0.10}),
        _entry("a", "objective", 0.19, **{"recall@20": 0.90}),  # best on test, worse on validation
        _entry("b", "objective", 0.20),                         # tie with default
        _entry("c", "ssl", 0.25),
        {"name": "d", "family": "ssl", "error": "boom"},
    ]
    assert ex.family_choices(entries) == {"objective": "default", "ssl": "c"}
    assert ex.best_on_validation(entries)["name"] == "c"


def test_judge_targets_says_by_how_much() -> None:
    e = _entry("default", "default", 0.2, **{"recall@20": 0.19, "tail_recall@100": 0.5, "cold_recall@20": 0.1}, seconds=130.0)
    rows = {r["metric"]: r for r in ex.judge_targets(e)}
    assert rows["recall@20"]["met"] is False and rows["recall@20"]["gap"] == pytest.approx(-0.01)
    assert rows["tail_recall@100"]["met"] is True and rows["tail_recall@100"]["gap"] == pytest.approx(0.1)
    assert rows["cold_recall@20"]["gap_rel"] == pytest.approx(-1 / 3, abs=1e-4)
    assert rows["train_seconds"]["met"] is False and rows["train_seconds"]["gap"] == pytest.approx(10.0)


# ---- markdown ------------------------------------------------------------------------------------


def test_write_markdown_keeps_prose(tmp_path: Path) -> None:
    md = tmp_path / "r.md"
    ex.write_markdown(md, "first\n")
    text = md.read_text()
    assert ex.BEGIN in text and ex.END in text and "first" in text
    md.write_text(f"# Mine\n\nhand prose above\n\n{ex.BEGIN}\nold table\n{ex.END}\n\nhand prose below\n")
    ex.write_markdown(md, "new table\n")
    assert md.read_text() == f"# Mine\n\nhand prose above\n\n{ex.BEGIN}\nnew table\n{ex.END}\n\nhand prose below\n"
    md.write_text("no markers here\n")
    ex.write_markdown(md, "t\n")
    assert md.read_text().startswith("no markers here\n") and f"{ex.BEGIN}\nt\n{ex.END}" in md.read_text()


# ---- the driver end to end -----------------------------------------------------------------------


@pytest.fixture()
def base_config(tmp_path: Path) -> Path:
    """The tiny test settings, as a --base-config file (changes to TrainConfig())."""
    p = tmp_path / "base.json"
    p.write_text(json.dumps(ex.config_diff(tiny_train_config().to_dict(), TrainConfig().to_dict())))
    return p


def _forbid_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fit(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("fit must not run: the result is cached")

    monkeypatch.setattr(ex, "fit", no_fit)


def test_driver_end_to_end(tiny_dataset: Path, base_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    common = ["--data", str(tiny_dataset), "--out", str(out), "--base-config", str(base_config)]
    assert ex.main([*common, "--only", "default,no_logq", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "default (default): val r@20" in printed and "no_logq (logq): val r@20" in printed

    res = json.loads((out / "ml100k.json").read_text())
    assert res["last_run"]["trained"] == ["default", "no_logq"]
    dataset = read_dataset(tiny_dataset)
    split = split_interactions(dataset.interactions)
    test_pairs = len(split.test.drop_duplicates(["user_id", "item_id"]))
    for name, logq in (("default", True), ("no_logq", False)):
        e = res["variants"][name]
        assert e["config"]["logq"] is logq and e["config"]["epochs"] == 1 and e["config"]["model"]["embedding_dim"] == 16
        assert e["epochs_run"] == e["best_epoch"] == 1
        assert 0.0 < e["val_recall@20"] <= 1.0 and 0.0 < e["val_recall@20_all_users"] <= 1.0
        for key in ("recall@20", "recall@100", "ndcg@20", "tail_recall@100", "coverage@20", "cold_recall@20"):
            assert 0.0 <= e["metrics"][key] <= 1.0
        assert e["train_seconds"] > 0
        dec = e["deciles"]
        assert sum(dec["pairs"]) == test_pairs and sum(dec["items"]) == len(dataset.items)
        assert dec["micro_recall@100"] == pytest.approx(sum(dec["hits"]) / sum(dec["pairs"]), abs=1e-4)
        assert all(r is None or 0.0 <= r <= 1.0 for r in dec["recall"])
    assert res["variants"]["default"]["config_hash"] != res["variants"]["no_logq"]["config_hash"]

    md = (out / "ml100k.md").read_text()
    assert md.count(ex.BEGIN) == 1 and md.count(ex.END) == 1
    d = res["variants"]["default"]["metrics"]
    assert f"| {d['recall@20']:.4f} | {d['recall@100']:.4f} | {d['ndcg@20']:.4f} |" in md  # the default's row
    assert "`no_logq`" in md and "| logq | `{\"logq\": false}` |" in md
    assert "| EASE (λ=200) | 0.1949 | 0.5186 |" in md and "Quick run" in md
    assert "| recall@20 |" in md and "| train_seconds |" in md  # targets
    assert "- logQ (without SSL)" in md and "tail_recall@100" in md  # the tail-items comparison
    assert (out / "ml100k_deciles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun trains nothing: both are cached; a new name with the default's config shares its result
    _forbid_fit(monkeypatch)
    vfile = tmp_path / "v.json"
    vfile.write_text(json.dumps([{"name": "default_again", "family": "custom", "overrides": {}}]))
    argv = [*common, "--only", "default,no_logq,default_again", "--epochs", "1", "--variants-file", str(vfile)]
    assert ex.main(argv) == 0
    res2 = json.loads((out / "ml100k.json").read_text())
    assert res2["last_run"]["trained"] == [] and res2["last_run"]["cached"] == ["default", "no_logq", "default_again"]
    again = res2["variants"]["default_again"]
    assert again["same_as"] == "default" and again["metrics"] == res["variants"]["default"]["metrics"]
    assert res2["variants"]["no_logq"]["metrics"] == res["variants"]["no_logq"]["metrics"]

    # --report-only: no data, no training, the prose around the markers survives
    md_path = out / "ml100k.md"
    text = md_path.read_text()
    head, rest = text.split(ex.BEGIN, 1)
    md_path.write_text("# Hand title\n\nHand-written reading of the results.\n\n" + ex.BEGIN + rest + "\nClosing prose.\n")
    before_json = (out / "ml100k.json").read_text()
    assert ex.main(["--out", str(out), "--report-only"]) == 0
    md = md_path.read_text()
    assert md.startswith("# Hand title\n\nHand-written reading of the results.\n\n" + ex.BEGIN)
    assert md.endswith(ex.END + "\n\nClosing prose.\n")
    assert "| logq | `{\"logq\": false}` |" in md
    assert "‡" in md  # default_again is not in the built-in list: flagged
    assert (out / "ml100k.json").read_text() == before_json

    # a result whose config no longer matches its variant is flagged stale, not passed off as current
    res2["variants"]["no_logq"]["config_hash"] = "0" * 16
    (out / "ml100k.json").write_text(json.dumps(res2))
    assert ex.main(["--out", str(out), "--report-only"]) == 0
    row = next(ln for ln in md_path.read_text().splitlines() if "| logq |" in ln)
    assert "`no_logq`" in row and "†" in row
    assert "†" not in next(ln for ln in md_path.read_text().splitlines() if ln.startswith("| **`default`") or ln.startswith("| `default`"))

    # --force re-trains; a failing fit is recorded (rc 1), not a crash of the whole matrix
    assert ex.main([*common, "--only", "no_logq", "--epochs", "1", "--force"]) == 1
    res3 = json.loads((out / "ml100k.json").read_text())
    assert "fit must not run" in res3["variants"]["no_logq"]["error"]
    assert "failed: AssertionError" in md_path.read_text()


def test_report_only_without_results_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ex.main(["--out", str(tmp_path), "--report-only"]) == 2
    assert "no results to report" in capsys.readouterr().err


def test_analyse_model_deciles_match_evaluate(tiny_bundle, tiny_dataset: Path) -> None:  # noqa: ANN001
    """The decile code's overall micro recall and the val recall agree with evaluate_model's view."""
    dataset = read_dataset(tiny_dataset)
    split = split_interactions(dataset.interactions)
    out = ex.analyse_model(tiny_bundle.model, dataset, split)
    dec = out["deciles"]
    # items per decile follow the train clicks
    counts = pd.Index(dataset.items["item_id"]).get_indexer(split.train["item_id"])
    bins = ex.popularity_deciles(counts, len(dataset.items))
    assert dec["items"] == np.bincount(bins, minlength=10).tolist()
    assert dec["pairs"][0] >= dec["pairs"][-1]  # the head gets the most test pairs
    from training.evaluate import evaluate_model

    val = evaluate_model(tiny_bundle.model, dataset, split, truth_part="val")
    assert out["val_recall@20_all_users"] == pytest.approx(val["recall@20"], abs=1e-4)
    assert out["val_recall@20_se"] > 0
    assert 0.0 <= out["val_features_only_recall@20"] <= 1.0
