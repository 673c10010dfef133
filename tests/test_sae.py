"""The SAE and the neuron-embedding loss, against naive per-neuron loops."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file

from ne.errors import DataError
from ne.parallel import SINGLE, Shard, make_optimizer
from ne.sae import SAE, NeuronEmbeddingLoss, SAEConfig, train_sae_epoch
from tests.conftest import require_shared

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


def naive_update(avg, seen, sae, a, f, m):
    avg, seen = avg.clone(), seen.clone()
    for j in range(M):
        w = f[:, j]
        if w.sum() > 0:
            mean = sum(w[i] * sae.embeddings(a, j)[i] for i in range(len(a))) / w.sum()
            avg[j] = m * avg[j] + (1 - m) * mean if seen[j] else mean
            seen[j] = True
    return avg, seen


def naive_loss(avg, seen, sae, a, f, only_active=True):
    terms = [
        1 - F.cosine_similarity(sae.embeddings(a, j)[i], avg[j], dim=0)
        for i in range(len(a)) for j in range(M) if seen[j] and (f[i, j] > 0 or not only_active)
    ]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("only_active", [True, False])
def test_ne_loss_matches_naive_loop(only_active):
    sae, a = setup()
    loss = NeuronEmbeddingLoss(M, D, momentum=0.9, only_active=only_active)
    f1 = sae.encode(a[:6]).detach()
    f2 = sae.encode(a[6:]).detach()
    avg, seen = torch.zeros(M, D), torch.zeros(M, dtype=torch.bool)
    for batch, f in ((a[:6], f1), (a[6:], f2)):
        loss.update(sae, batch, f)
        avg, seen = naive_update(avg, seen, sae, batch, f, 0.9)
        torch.testing.assert_close(loss.avg, avg)
        assert torch.equal(loss.seen, seen)
    assert seen.any()
    f = sae.encode(a[6:])
    value = loss(sae, a[6:], f)
    expected = naive_loss(avg, seen, sae, a[6:], f, only_active)
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
        sae = SAE(acts.shape[1], 4 * acts.shape[1], torch.Generator().manual_seed(seed))
        opt = make_optimizer(cfg.optimizer, sae.parameters(), cfg.lr)
        ne = NeuronEmbeddingLoss(sae.n_neurons, acts.shape[1], cfg.ne_momentum) if with_ne else None
        step, losses = train_sae_epoch(sae, opt, acts, cfg, seed, 0, 0, ne, shard)
        out.append((sae, losses, step))
    return out


def toy_acts(n=640, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, d, generator=g) + 0.3)


def test_ne_loss_switches_on_at_start_step():
    acts = toy_acts()
    late = SAEConfig(batch_size=32, l1_coeff=0.01, ne_coeff=1.0, ne_start_step=1000)
    (std, _, steps), (ne, ne_losses, _) = train_pair(acts, late)
    assert steps == 20 and ne_losses["l_n"] == 0.0
    for k in std.state_dict():  # never switched on: the NE-loss SAE is the standard SAE, bit for bit
        assert torch.equal(std.state_dict()[k], ne.state_dict()[k])
    early = SAEConfig(batch_size=32, l1_coeff=0.01, ne_coeff=1.0, ne_start_step=10)
    (std, _, _), (ne, ne_losses, _) = train_pair(acts, early)
    assert ne_losses["l_n"] > 0 and not torch.equal(std.W_enc, ne.W_enc)
    (std2, _, _), (ne2, _, _) = train_pair(acts, early)
    assert torch.equal(ne.W_enc, ne2.W_enc) and torch.equal(std.W_dec, std2.W_dec)  # deterministic


def _worker(rank, world, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = SAEConfig(batch_size=32, l1_coeff=0.01, ne_coeff=1.0, ne_start_step=5)
        pairs = train_pair(toy_acts(), cfg, shard=Shard.current())
        if rank == 0:
            torch.save({f"{i}.{k}": v for i, (s, _, _) in enumerate(pairs) for k, v in s.state_dict().items()},
                       result_file)
        dist.barrier()  # tear gloo down only when both ranks are done: an early teardown can abort the other
    finally:
        dist.destroy_process_group()


def test_two_workers_follow_one_worker(tmp_path):
    """Gradients summed over row-sliced batches reproduce the single-process run (NE loss included)."""
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two.pt")), nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    cfg = SAEConfig(batch_size=32, l1_coeff=0.01, ne_coeff=1.0, ne_start_step=5)
    one = train_pair(toy_acts(), cfg)
    for i, (sae, _, _) in enumerate(one):
        for k, v in sae.state_dict().items():
            torch.testing.assert_close(two[f"{i}.{k}"], v, atol=1e-5, rtol=1e-4)


def test_sae_load_checks_names_and_shapes(tmp_path):
    good = {"W_enc": torch.zeros(16, 4), "b_enc": torch.zeros(16), "W_dec": torch.zeros(4, 16), "b_dec": torch.zeros(4)}
    save_file({k.lower(): v for k, v in good.items()}, str(tmp_path / "names.safetensors"))
    with pytest.raises(DataError, match="expected exactly \\['W_dec', 'W_enc', 'b_dec', 'b_enc'\\]"):
        SAE.load(str(tmp_path / "names.safetensors"))
    save_file(good, str(tmp_path / "ok.safetensors"))
    assert SAE.load(str(tmp_path / "ok.safetensors"), 4).n_neurons == 16
    with pytest.raises(DataError, match="W_enc has shape \\[16, 4\\], expected \\[None, 64\\]"):
        SAE.load(str(tmp_path / "ok.safetensors"), 64)
    save_file({**good, "W_dec": torch.zeros(4, 15)}, str(tmp_path / "dec.safetensors"))
    with pytest.raises(DataError, match="disagree"):
        SAE.load(str(tmp_path / "dec.safetensors"))


def test_authors_saes_load():
    folder = require_shared("mechmnistic")
    for name in ("sae_standard", "sae_ne_loss"):
        sae = SAE.load(str(folder / f"{name}.safetensors"), 64)
        assert sae.W_enc.shape == (512, 64) and sae.W_dec.shape == (64, 512)


def test_shard_rows_partition_the_batch():
    batch = torch.arange(11)
    parts = [Shard(r, 3).rows(batch) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(11))
