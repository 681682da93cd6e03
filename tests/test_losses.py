"""Each vectorised loss term against a naive loop implementation of the paper's formula."""

import math

import numpy as np
import pytest
import torch

from cellular.nn import (
    batch_mixing_loss,
    centroid_distance_loss,
    centroid_target_distances,
    inverse_frequency_weights,
    soft_nearest_neighbour_loss,
)

TOL = dict(rel=1e-5, abs=1e-5)
NP_TOL = dict(rtol=1e-5, atol=1e-5)


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def naive_snn(z, labels, temperature, weights):
    z, labels = z.double().numpy(), labels.numpy()
    per_type = {}
    for i in range(len(z)):
        if labels[i] < 0:
            continue
        positive, negative, n_pos, n_neg = 0.0, 0.0, 0, 0
        for j in range(len(z)):
            if j == i or labels[j] < 0:
                continue
            s = math.exp(cosine(z[i], z[j]) / temperature)
            if labels[j] == labels[i]:
                positive += s
                n_pos += 1
            else:
                negative += s
                n_neg += 1
        if n_pos >= 1 and n_neg >= 1:
            per_type.setdefault(labels[i], []).append(-math.log(positive / (positive + negative)))
    return sum((1.0 if weights is None else float(weights[c])) * np.mean(v) for c, v in per_type.items())


def naive_batch(z, labels, batches, temperature, weights):
    z, labels, batches = z.double().numpy(), labels.numpy(), batches.numpy()
    per_batch = {}
    for i in range(len(z)):
        if labels[i] < 0:
            continue
        positive, negative, n_pos, n_neg = 0.0, 0.0, 0, 0
        for j in range(len(z)):
            if j == i or labels[j] != labels[i]:
                continue
            s = math.exp(cosine(z[i], z[j]) / temperature)
            if batches[j] == batches[i]:
                positive += s
                n_pos += 1
            else:
                negative += s
                n_neg += 1
        if n_pos >= 1 and n_neg >= 1:
            per_batch.setdefault(batches[i], []).append(1.0 / -math.log(positive / (positive + negative)))
    return sum((1.0 if weights is None else float(weights[b])) * np.mean(v) for b, v in per_batch.items())


def naive_centroid(z, labels, target):
    z, labels, target = z.double().numpy(), labels.numpy(), target.double().numpy()
    types = sorted({int(c) for c in labels if c >= 0})
    centroids = {c: z[labels == c].mean(0) for c in types}
    latent, reference = [], []
    for a in types:
        for b in types:
            if target[a, b] != 0:
                latent.append(np.linalg.norm(centroids[a] - centroids[b]))
                reference.append(target[a, b])
    if not latent:
        return 0.0
    latent, reference = np.array(latent), np.array(reference)
    return float(np.mean((latent / latent.max() - reference / reference.max()) ** 2))


def naive_target(centroids, present):
    n_batches, n_types, _ = centroids.shape
    out = np.zeros((n_types, n_types))
    for a in range(n_types):
        for b in range(n_types):
            if a == b:
                continue
            d = [
                np.linalg.norm(centroids[k, a] - centroids[k, b])
                for k in range(n_batches)
                if present[k, a] and present[k, b]
            ]
            out[a, b] = np.mean(d) if d else 0.0
    return out / out.max() if out.max() > 0 else out


def random_case(seed, n=40, d=8, n_types=4, n_batches=3, unlabelled=0.1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    labels = torch.randint(0, n_types, (n,), generator=g)
    labels[torch.rand(n, generator=g) < unlabelled] = -1
    batches = torch.randint(0, n_batches, (n,), generator=g)
    return z, labels, batches


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("weighted", [True, False])
def test_snn_matches_naive(seed, weighted):
    z, labels, _ = random_case(seed)
    weights = inverse_frequency_weights(labels, 4) if weighted else None
    for temperature in (0.1, 0.25, 2.0):
        got = soft_nearest_neighbour_loss(z, labels, temperature, weights)
        assert got.item() == pytest.approx(naive_snn(z, labels, temperature, weights), **TOL)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("weighted", [True, False])
def test_batch_term_matches_naive(seed, weighted):
    z, labels, batches = random_case(seed)
    weights = inverse_frequency_weights(batches, 3) if weighted else None
    got = batch_mixing_loss(z, labels, batches, 0.5, weights)
    assert got.item() == pytest.approx(naive_batch(z, labels, batches, 0.5, weights), **TOL)


@pytest.mark.parametrize("seed", range(5))
def test_centroid_term_matches_naive(seed):
    z, labels, _ = random_case(seed)
    target = torch.rand(4, 4)
    target = (target + target.T) / 2
    target.fill_diagonal_(0)
    target[0, 3] = target[3, 0] = 0.0  # a pair never seen together in the reference
    got = centroid_distance_loss(z, labels, target)
    assert got.item() == pytest.approx(naive_centroid(z, labels, target), **TOL)


def test_centroid_target_matches_naive():
    g = torch.Generator().manual_seed(3)
    centroids = torch.randn(3, 5, 6, generator=g)
    present = torch.rand(3, 5, generator=g) > 0.3
    present[:, 4] = False
    present[0, 4] = True  # type 4 only in batch 0
    present[1, 3] = present[2, 3] = False
    got = centroid_target_distances(centroids, present).numpy()
    np.testing.assert_allclose(got, naive_target(centroids.numpy(), present.numpy()), **NP_TOL)


def test_single_cell_types_single_batch_and_unlabelled():
    # type 2 has a single cell, type 3 is only unlabelled cells, one batch only
    z = torch.randn(9, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 0, 1, 1, 2, -1, -1, -1])
    batches = torch.zeros(9, dtype=torch.long)
    weights = inverse_frequency_weights(labels, 3)
    snn = soft_nearest_neighbour_loss(z, labels, 0.25, weights)
    assert snn.item() == pytest.approx(naive_snn(z, labels, 0.25, weights), **TOL)
    assert batch_mixing_loss(z, labels, batches, 0.5, torch.ones(1)).item() == 0.0
    target = torch.ones(3, 3) - torch.eye(3)
    assert centroid_distance_loss(z, labels, target).item() == pytest.approx(naive_centroid(z, labels, target), **TOL)


def test_degenerate_minibatches_give_zero_with_gradient():
    z = torch.randn(4, 3, requires_grad=True)
    one_type = torch.zeros(4, dtype=torch.long)
    unlabelled = torch.full((4,), -1)
    for labels in (one_type, unlabelled):
        total = (
            soft_nearest_neighbour_loss(z, labels, 0.25, torch.ones(1))
            + batch_mixing_loss(z, labels, torch.zeros(4, dtype=torch.long), 0.5, torch.ones(1))
            + centroid_distance_loss(z, labels, torch.zeros(1, 1))
        )
        assert total.item() == 0.0
        total.backward()
        assert torch.all(z.grad == 0)
        z.grad = None


def test_unlabelled_cells_do_not_change_supervised_terms():
    z, labels, batches = random_case(7, unlabelled=0.0)
    extra = torch.randn(6, z.shape[1])
    z_all = torch.cat([z, extra])
    labels_all = torch.cat([labels, torch.full((6,), -1)])
    batches_all = torch.cat([batches, torch.zeros(6, dtype=torch.long)])
    w = inverse_frequency_weights(labels, 4)
    assert soft_nearest_neighbour_loss(z_all, labels_all, 0.3, w).item() == pytest.approx(
        soft_nearest_neighbour_loss(z, labels, 0.3, w).item(), **TOL
    )
    assert batch_mixing_loss(z_all, labels_all, batches_all, 0.5).item() == pytest.approx(
        batch_mixing_loss(z, labels, batches, 0.5).item(), **TOL
    )
    target = torch.rand(4, 4) + 0.1
    assert centroid_distance_loss(z_all, labels_all, target).item() == pytest.approx(
        centroid_distance_loss(z, labels, target).item(), **TOL
    )


def test_gradients_flow_to_embedding_and_temperature():
    z, labels, batches = random_case(11)
    z.requires_grad_(True)
    temperature = torch.tensor(0.25, requires_grad=True)
    target = torch.rand(4, 4)
    target = target + target.T
    target.fill_diagonal_(0)
    loss = (
        soft_nearest_neighbour_loss(z, labels, temperature, inverse_frequency_weights(labels, 4))
        + batch_mixing_loss(z, labels, batches, 0.5)
        + centroid_distance_loss(z, labels, target)
    )
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert temperature.grad is not None and temperature.grad.abs() > 0


def test_inverse_frequency_weights():
    codes = torch.tensor([0, 0, 0, 1, -1, 2, 2])
    w = inverse_frequency_weights(codes, 4)
    expected = np.array([1 / 3, 1.0, 1 / 2, 0.0])
    np.testing.assert_allclose(w.numpy(), expected / expected.sum(), rtol=1e-6)
