"""SSL augmentations, mutual information and the contrastive loss, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.ssl import (
    SSLTask,
    complementary_split,
    correlated_split,
    feature_groups,
    feature_mutual_information,
    mask_features,
    multi_value_dropout,
    mutual_information,
    random_feature_masking,
    ssl_loss,
)


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    return {
        "id": torch.arange(1, n + 1),
        "cat.category": torch.full((n,), 3),
        "multi.tags": torch.tensor([[2, 3, 0]] * n),
        "cont.price": torch.full((n,), 0.7),
        "bucket.price": torch.full((n,), 4),
    }


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_feature_groups_pair_continuous_keys() -> None:
    g = feature_groups(_batch())
    assert g == {"id": ["id"], "cat.category": ["cat.category"], "multi.tags": ["multi.tags"], "price": ["cont.price", "bucket.price"]}
    with pytest.raises(ValueError, match="unexpected encoded key 'foo'"):
        feature_groups({"foo": torch.zeros(1)})


def test_mask_features_sets_missing_values() -> None:
    b = _batch(3)
    g = feature_groups(b)
    m = mask_features(b, g, ["price", "multi.tags"])
    assert m["cont.price"].tolist() == [0.0] * 3 and m["bucket.price"].tolist() == [0] * 3
    assert m["multi.tags"].tolist() == [[0, 0, 0]] * 3
    assert torch.equal(m["id"], b["id"]) and torch.equal(b["bucket.price"], torch.full((3,), 4))  # input untouched
    rows = torch.tensor([True, False, True])
    m = mask_features(b, g, ["id", "multi.tags"], rows)
    assert m["id"].tolist() == [0, 2, 0] and m["multi.tags"].tolist() == [[0, 0, 0], [2, 3, 0], [0, 0, 0]]


def test_random_feature_masking_rate() -> None:
    b = _batch(20_000)
    v = random_feature_masking(b, feature_groups(b), 0.3, _gen())
    for key in ("id", "cat.category", "bucket.price"):
        assert abs((v[key] == 0).float().mean().item() - 0.3) < 0.02, key
    # a continuous feature is masked as a whole: z-score and bucket together
    assert torch.equal(v["cont.price"] == 0, v["bucket.price"] == 0)


def test_multi_value_dropout_keeps_padding_and_rate() -> None:
    b = _batch(20_000)
    v = multi_value_dropout(b, 0.25, _gen())
    tok = v["multi.tags"]
    assert (tok[:, 2] == 0).all()  # padding stays padding
    assert abs((tok[:, :2] == 0).float().mean().item() - 0.25) < 0.02
    assert torch.equal(v["cat.category"], b["cat.category"])  # other features untouched


def test_complementary_split_partitions_features() -> None:
    names = ["id", "a", "b", "c", "d"]
    for seed in range(5):
        s, c = complementary_split(names, torch.Generator().manual_seed(seed))
        assert len(s) == 2 and set(s) | set(c) == set(names) and not set(s) & set(c)


def test_mutual_information_by_hand() -> None:
    x = np.array([0, 0, 1, 1])
    assert mutual_information(x, x) == pytest.approx(math.log(2))
    assert mutual_information(x, np.array([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    # y = (0, 0, 0, 1): H(y) = −(¾ log ¾ + ¼ log ¼), H(y|x) = ½ log 2 → MI = H(y) − ½ log 2
    hy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert mutual_information(x, np.array([0, 0, 0, 1])) == pytest.approx(hy - 0.5 * math.log(2))


def test_correlated_split_masks_seed_with_its_most_correlated_half() -> None:
    cat = {
        "cat.a": np.array([0, 0, 1, 1, 2, 2, 3, 3]),
        "cat.b": np.array([5, 5, 6, 6, 7, 7, 8, 8]),  # a copy of a
        "cat.c": np.array([0, 1, 0, 1, 0, 1, 0, 1]),  # independent of a
        "cat.d": np.array([1, 0, 1, 0, 1, 0, 1, 0]),  # a relabelled copy of c
    }
    g = feature_groups(cat)
    mi = feature_mutual_information(cat, g)
    assert mi[0, 1] == pytest.approx(math.log(4)) and mi[0, 2] == pytest.approx(0.0, abs=1e-12)
    names = list(g)
    for seed in range(20):
        s, c = correlated_split(names, mi, torch.Generator().manual_seed(seed))
        assert len(s) == 2 and set(s) | set(c) == set(names)
        # {a, b} and {c, d} are copies: whichever is the seed, its copy is masked with it
        assert ("cat.a" in s) == ("cat.b" in s), s


def test_ssl_loss_by_hand() -> None:
    z = torch.eye(2, dtype=torch.float64)
    tau = 0.5
    want = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1))
    assert ssl_loss(z, z, tau).item() == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match=r"\(2, 2\) and \(3, 2\)"):
        ssl_loss(z, torch.zeros(3, 2), tau)


def test_ssl_items_drawn_uniformly_from_catalog() -> None:
    cat = _batch(10)
    task = SSLTask(cat, augmentation="complementary", batch_size=3)
    g = _gen()
    draws = torch.cat([task.sample_items(g) for _ in range(4000)])
    f = np.bincount(draws.numpy(), minlength=10) / len(draws)
    assert np.abs(f - 0.1).max() < 0.01
    assert len(set(task.sample_items(g).tolist())) == 3  # no duplicates inside an SSL batch
    v1, v2 = task.views(cat, g)
    masked1 = {n for n, keys in task.groups.items() if (v1[keys[0]] == 0).all()}
    masked2 = {n for n, keys in task.groups.items() if (v2[keys[0]] == 0).all()}
    assert masked1.isdisjoint(masked2) and masked1 | masked2 == set(task.groups)
    with pytest.raises(ValueError, match="ssl_augmentation 'mixup' is not one of"):
        SSLTask(cat, augmentation="mixup")


@pytest.mark.parametrize("augmentation", ["complementary", "correlated"])
def test_two_view_splits_need_two_feature_groups_when_configured(augmentation: str) -> None:
    """A catalog with no item features (the id alone) failed at the first training step."""
    with pytest.raises(ValueError, match=rf"ssl_augmentation '{augmentation}' splits the item features .* \['id'\]"):
        SSLTask({"id": torch.arange(1, 6)}, augmentation=augmentation)
    SSLTask({"id": torch.arange(1, 6)}, augmentation="random")  # masks the id itself: fine


def test_multi_dropout_without_multi_valued_features_is_an_error() -> None:
    """With no multi_categorical feature both views were the unchanged batch: SSL without any
    augmentation, silently."""
    cat = {k: v for k, v in _batch(10).items() if not k.startswith("multi.")}
    with pytest.raises(ValueError, match="'multi_dropout' drops tokens of multi_categorical"):
        SSLTask(cat, augmentation="multi_dropout")
    assert any(k.startswith("multi.") for k in _batch(10))
    SSLTask(_batch(10), augmentation="multi_dropout")


def test_ssl_items_on_a_big_catalog_are_drawn_in_o_m_without_replacement(monkeypatch: pytest.MonkeyPatch) -> None:
    """A catalog much larger than the SSL batch: no permutation of the catalog (O(catalog) per
    step), still m distinct rows, uniformly over the catalog."""
    cat = _batch(10)
    task = SSLTask(cat, augmentation="complementary", batch_size=8)
    task.n_items = 1000  # the draw only needs the catalog's size

    def no_randperm(*a, **k):
        raise AssertionError("randperm over the whole catalog")

    monkeypatch.setattr(torch, "randperm", no_randperm)
    g = _gen()
    draws = [task.sample_items(g) for _ in range(3000)]
    assert all(len(d) == 8 and len(set(d.tolist())) == 8 for d in draws)
    f = np.bincount(torch.cat(draws).numpy(), minlength=1000) / (8 * 3000)
    assert f.min() > 0 and np.abs(f - 0.001).max() < 0.0012  # ~24 draws per item: within ~5 sigma
    assert torch.cat(draws).max() < 1000
