"""The SAE and the neuron-embedding loss, against naive per-neuron loops."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ne.compute.parallel import SINGLE, Shard
from ne.compute.sae import SAE, NeuronEmbeddingLoss, SAEConfig, build_sae, sae_optimizer, train_sae_epoch
from ne.errors import ConfigError

torch.set_num_threads(1)
D, M = 6, 10


def setup(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    sae = SAE(D, M, g)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
    a = torch.relu(torch.randn(n, D, generator=g))
    return sae, a


def test_sae_formula_and_embeddings():
    sae, a = setup()
    f, a_hat = sae(a)
    torch.testing.assert_close(f, torch.relu((a - sae.b_dec) @ sae.W_enc.T + sae.b_enc))
    torch.testing.assert_close(a_hat, f @ sae.W_dec.T + sae.b_dec)
    for j in range(M):  # summing the embedding and adding b_enc gives the pre-activation
        e = sae.embeddings(a, j)
        torch.testing.assert_close(e, (a - sae.b_dec) * sae.W_enc[j])
        torch.testing.assert_close(torch.relu(e.sum(1) + sae.b_enc[j]), f[:, j])


def naive_update(avg, seen, sae, a, f, m, average="activation"):
    avg, seen = avg.clone(), seen.clone()
    for j in range(M):
        w = f[:, j]
        if w.sum() > 0:
            e = sae.embeddings(a, j)
            if average == "unit":
                e = torch.stack([e[i] / e[i].norm() for i in range(len(a))])
            mean = sum(w[i] * e[i] for i in range(len(a))) / w.sum()
            avg[j] = m * avg[j] + (1 - m) * mean if seen[j] else mean
            seen[j] = True
    return avg, seen


def naive_loss(avg, seen, sae, a, f, examples="active", aggregate="pairs", distance="cosine"):
    def dist(e, v):
        if distance == "euclidean":
            return ((e - v) ** 2).sum()
        return 1 - F.cosine_similarity(e, v, dim=0)

    per_neuron = {
        j: [
            dist(sae.embeddings(a, j)[i], avg[j])
            for i in range(len(a))
            if seen[j] and (f[i, j] > 0 or examples == "all")
        ]
        for j in range(M)
    }
    if aggregate == "pairs":
        return torch.stack([t for terms in per_neuron.values() for t in terms]).mean()
    return torch.stack([torch.stack(terms).mean() for terms in per_neuron.values() if terms]).mean()


READINGS = [
    dict(examples="active", aggregate="pairs", average="activation", distance="cosine"),
    dict(examples="all", aggregate="pairs", average="activation", distance="cosine"),
    dict(examples="active", aggregate="neurons", average="activation", distance="cosine"),
    dict(examples="all", aggregate="neurons", average="unit", distance="cosine"),
    dict(examples="active", aggregate="pairs", average="unit", distance="euclidean"),
]


@pytest.mark.parametrize("reading", READINGS)
def test_ne_loss_matches_naive_loop(reading):
    sae, a = setup()
    loss = NeuronEmbeddingLoss(M, D, momentum=0.9, **reading)
    f1 = sae.encode(a[:6]).detach()
    f2 = sae.encode(a[6:]).detach()
    avg, seen = torch.zeros(M, D), torch.zeros(M, dtype=torch.bool)
    for batch, f in ((a[:6], f1), (a[6:], f2)):
        loss.update(sae, batch, f)
        avg, seen = naive_update(avg, seen, sae, batch, f, 0.9, reading["average"])
        torch.testing.assert_close(loss.avg, avg)
        assert torch.equal(loss.seen, seen)
    assert seen.any() and not seen.all()  # some neurons are never active, so `seen` matters
    f = sae.encode(a[6:])
    value = loss(sae, a[6:], f)
    expected = naive_loss(avg, seen, sae, a[6:], f, reading["examples"], reading["aggregate"], reading["distance"])
    torch.testing.assert_close(value, expected)
    # Gradients reach the encoder and b_dec; the average is a buffer, not a parameter.
    value.backward()
    assert sae.W_enc.grad.abs().sum() > 0 and sae.b_dec.grad.abs().sum() > 0
    assert "avg" not in dict(loss.named_parameters())


def test_inactive_neuron_keeps_its_average():
    sae, a = setup()
    loss = NeuronEmbeddingLoss(M, D)
    f = sae.encode(a).detach()
    loss.update(sae, a, f)
    before = loss.avg.clone()
    silent = f.clone()
    silent[:, 0] = 0
    loss.update(sae, a, silent)
    torch.testing.assert_close(loss.avg[0], before[0])
    torch.testing.assert_close(loss.avg[1:], before[1:])  # same batch mean: momentum keeps it fixed


def train_pair(acts, cfg, seed=0, shard=SINGLE):
    out = []
    for with_ne in (False, True):
        sae = build_sae(cfg, acts, torch.Generator().manual_seed(seed))
        opt = sae_optimizer(sae, cfg)
        ne = NeuronEmbeddingLoss.from_config(sae.n_neurons, acts.shape[1], cfg) if with_ne else None
        step, losses = train_sae_epoch(sae, opt, acts, cfg, seed, 0, 0, ne, shard)
        out.append((sae, losses, step))
    return out


def toy_acts(n=640, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, d, generator=g) + 0.3)


def test_ne_loss_switches_on_at_start_step():
    acts = toy_acts()
    late = SAEConfig(expansion=4, batch_size=32, l1_coeff=0.01, ne_coeff=1.0, ne_start_step=1000)
    (std, _, steps), (ne, ne_losses, _) = train_pair(acts, late)
    assert steps == 20 and ne_losses["l_n"] == 0.0
    for k in std.state_dict():  # never switched on: the NE-loss SAE is the standard SAE, bit for bit
        assert torch.equal(std.state_dict()[k], ne.state_dict()[k])
    early = SAEConfig(expansion=4, batch_size=32, l1_coeff=0.01, ne_coeff=1.0, ne_start_step=10)
    (std, _, _), (ne, ne_losses, _) = train_pair(acts, early)
    assert ne_losses["l_n"] > 0 and not torch.equal(std.W_enc, ne.W_enc)
    (std2, _, _), (ne2, _, _) = train_pair(acts, early)
    assert torch.equal(ne.W_enc, ne2.W_enc) and torch.equal(std.W_dec, std2.W_dec)  # deterministic


# The default recipe, and every alternative reading at once: both must not depend on the number of workers.
WORKER_CONFIGS = [
    SAEConfig(expansion=4, batch_size=32, l1_coeff=0.01, ne_coeff=1.0, ne_start_step=5),
    SAEConfig(
        expansion=4,
        batch_size=32,
        l1_coeff=0.01,
        ne_coeff=1.0,
        ne_start_step=5,
        optimizer="adamw",
        l1_weighting="decoder_norm",
        decoder_norm="unit",
        b_dec_init="mean",
        w_dec_init="transpose",
        ne_examples="all",
        ne_aggregate="neurons",
        ne_average="unit",
        ne_distance="euclidean",
    ),
]


def _worker(rank, world, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for c, cfg in enumerate(WORKER_CONFIGS):
            pairs = train_pair(toy_acts(), cfg, shard=Shard.current())
            results.update({f"{c}.{i}.{k}": v for i, (s, _, _) in enumerate(pairs) for k, v in s.state_dict().items()})
        if rank == 0:
            torch.save(results, result_file)
        dist.barrier()  # tear gloo down only when both ranks are done: an early teardown can abort the other
    finally:
        dist.destroy_process_group()


def test_two_workers_follow_one_worker(tmp_path):
    """Gradients summed over row-sliced batches reproduce the single-process run (NE loss included)."""
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two.pt")), nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for c, cfg in enumerate(WORKER_CONFIGS):
        one = train_pair(toy_acts(), cfg)
        for i, (sae, _, _) in enumerate(one):
            for k, v in sae.state_dict().items():
                torch.testing.assert_close(two[f"{c}.{i}.{k}"], v, atol=1e-5, rtol=1e-4)


def adam_l2_naive(p0, lr, wd, steps, b1=0.9, b2=0.999, eps=1e-8):
    """Adam on a parameter whose only gradient is the L2 term wd × p, one float64 scalar at a time."""
    out = []
    for x in p0.double().flatten().tolist():
        m = v = 0.0
        for t in range(1, steps + 1):
            g = wd * x
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            x -= lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)) ** 0.5 + eps)
        out.append(x)
    return torch.tensor(out).reshape(p0.shape)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_weight_decay_reaches_every_parameter_of_a_dead_neuron(optimizer):
    """A neuron that never fires gets no gradient from the data, so its weights show the decay alone: Adam's
    coupled L2 (the authors' recipe) against a scalar loop, AdamW's decoupled decay against (1 - lr wd)^t."""
    acts = toy_acts(n=320)
    cfg = SAEConfig(expansion=4, batch_size=32, optimizer=optimizer, lr=1e-2, weight_decay=0.5, l1_coeff=0.01)
    sae = build_sae(cfg, acts, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc[3] = -1e3  # neuron 3 never fires
    start = {"W_enc": sae.W_enc[3].clone(), "W_dec": sae.W_dec[:, 3].clone(), "b_enc": sae.b_enc[3:4].clone()}
    steps, _ = train_sae_epoch(sae, sae_optimizer(sae, cfg), acts, cfg, 0, 0, 0)
    now = {"W_enc": sae.W_enc[3], "W_dec": sae.W_dec[:, 3], "b_enc": sae.b_enc[3:4]}
    for name, p0 in start.items():
        if optimizer == "adam":
            expected = adam_l2_naive(p0, cfg.lr, cfg.weight_decay, steps).float()
        else:
            expected = p0 * (1 - cfg.lr * cfg.weight_decay) ** steps
        torch.testing.assert_close(now[name].detach(), expected, atol=1e-5, rtol=1e-4)
        assert now[name].abs().max() < p0.abs().max()
    plain = build_sae(replace(cfg, weight_decay=0.0), acts, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain.b_enc[3] = -1e3
    train_sae_epoch(plain, sae_optimizer(plain, replace(cfg, weight_decay=0.0)), acts, cfg, 0, 0, 0)
    assert torch.equal(plain.W_enc[3], start["W_enc"])  # without decay a dead neuron keeps its initial weights


def test_l1_weighting_and_unit_decoder():
    acts = toy_acts(n=64)
    cfg = SAEConfig(expansion=4, batch_size=64, l1_coeff=0.01, l1_weighting="decoder_norm", decoder_norm="unit")
    sae = build_sae(cfg, acts, torch.Generator().manual_seed(0))
    norms = [sae.W_dec[:, j].norm() for j in range(sae.n_neurons)]
    torch.testing.assert_close(torch.stack(norms), torch.ones(sae.n_neurons))
    with torch.no_grad():  # columns of different norms, so the weighting matters
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, sae.n_neurons))
    f, dec = sae.encode(acts).detach(), sae.W_dec.detach()
    expected = sum(float(f[i, j].abs() * dec[:, j].norm()) for i in range(64) for j in range(sae.n_neurons)) / 64
    _, losses = train_sae_epoch(sae, sae_optimizer(sae, cfg), acts, cfg, 0, 0, 0)  # one batch: logged before the step
    assert losses["l1"] == pytest.approx(expected, rel=1e-5)
    assert losses["l1"] != pytest.approx(float(f.abs().sum()) / 64, rel=1e-3)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(sae.n_neurons))  # renormalised after the step


def test_build_sae_initialisations():
    acts = toy_acts(n=50)
    default = build_sae(SAEConfig(expansion=4), acts, torch.Generator().manual_seed(7))
    same = SAE(8, 32, torch.Generator().manual_seed(7))  # the default is the plain SAE, bit for bit
    for k, v in same.state_dict().items():
        assert torch.equal(default.state_dict()[k], v)
    assert not default.b_dec.any()
    other = build_sae(
        SAEConfig(expansion=4, b_dec_init="mean", w_dec_init="transpose"), acts, torch.Generator().manual_seed(7)
    )
    column_means = torch.tensor([sum(float(acts[i, d]) for i in range(50)) / 50 for d in range(8)])
    torch.testing.assert_close(other.b_dec, column_means)
    assert torch.equal(other.W_dec, other.W_enc.T) and torch.equal(other.W_enc, default.W_enc)


def test_bad_sae_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="sae.weight_decay is -0.1; it must be >= 0"):
        SAEConfig(weight_decay=-0.1)
    with pytest.raises(ConfigError, match="sae.decoder_norm is 'fixed'; choose one of 'free', 'unit'"):
        SAEConfig(decoder_norm="fixed")
    with pytest.raises(ConfigError, match="sae.ne_aggregate is 'batch'; choose one of 'pairs', 'neurons'"):
        SAEConfig(ne_aggregate="batch")


def test_shard_rows_partition_the_batch():
    batch = torch.arange(11)
    parts = [Shard(r, 3).rows(batch) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(11))
