"""Language-model SAEs: hooks on every back end, the shuffling buffer, the three architectures against SAELens,
training and resuming in process, the evaluation against naive computations, and the errors of bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ne.config import DataConfig, HarvestConfig, ModelConfig, RunConfig, UnitsSAEConfig
from ne.errors import ConfigError, DataError
from ne.lm_sae.buffer import ActivationBuffer, ShufflePlan, StreamContext, held_out, stream_contexts, stream_rows
from ne.lm_sae.config import LMSAEConfig, LMSAEEvalConfig, SAECompareConfig, SAETrainerConfig
from ne.lm_sae.model import LMSAE, saelens_files
from ne.lm_sae.train import TrainState, train_sae
from ne.models import load_model
from ne.models.hooks import hooked, read_hook
from ne.parallel import Shard
from ne.store import RunDir

sae_lens = pytest.importorskip("sae_lens", reason='the SAE tests need sae-lens: pip install -e ".[test]"')

torch.set_num_threads(1)  # small tensors: one thread is as fast, and stays fast on a busy machine

MINILM = ModelConfig(backend="hf", name="all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_model_cfg):
    return load_model(tiny_model_cfg)


@pytest.fixture(scope="module")
def minilm():
    return load_model(MINILM)


def _tokens(model, n: int = 12, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two contexts of real text, the second shorter (padded), BOS first where the model uses one."""
    from pydoc_data.topics import topics

    from ne.data import pad_batch

    bos = [] if model.bos_token_id is None else [model.bos_token_id]
    ids = model.encode(topics["for"])
    return pad_batch([bos + ids[: n - 1], bos + ids[n : 2 * n - 4]][:rows], model.pad_token_id)


# --- hooks -----------------------------------------------------------------------------------------------


def test_read_hook_equals_each_back_ends_own_activations(tiny, minilm, tmp_path):
    """TransformerLens: its cache; Hugging Face: hidden_states for the residual stream, the MLP neurons as
    `MLPModel.run` gives them, the MLP output as its output map applied to those neurons."""
    tokens, mask = _tokens(tiny, rows=1)
    hooks = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.0.mlp.hook_post"]
    _, cache = tiny.model.run_with_cache(tokens, names_filter=hooks)
    for hook in hooks:
        torch.testing.assert_close(read_hook(tiny, tokens, mask, hook), cache[hook])

    tokens, mask = _tokens(minilm)
    real = mask.bool()
    with torch.no_grad():
        states = minilm.model(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states
        act = minilm.run(tokens, mask, [2])[2].act
        mlp_out = minilm.model.encoder.layer[2].output.dense(act)
    for hook, expected in [("blocks.2.hook_resid_pre", states[2]), ("blocks.2.hook_resid_post", states[3]),
                           ("blocks.2.mlp.hook_post", act), ("blocks.2.hook_mlp_out", mlp_out)]:
        torch.testing.assert_close(read_hook(minilm, tokens, mask, hook)[real], expected[real], atol=1e-5, rtol=1e-4)

    from tests.conftest import write_gated_hf

    llama = load_model(ModelConfig(backend="hf", name=str(write_gated_hf(tmp_path)), device="cpu"))
    tokens, mask = _tokens(llama)
    with torch.no_grad():
        states = llama.model(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states
        act = llama.run(tokens, mask, [0])[0].act
        mlp_out = llama.model.layers[0].mlp.down_proj(act)
    for hook, expected in [("blocks.0.hook_resid_post", states[1]), ("blocks.0.mlp.hook_post", act),
                           ("blocks.0.hook_mlp_out", mlp_out)]:
        torch.testing.assert_close(read_hook(llama, tokens, mask, hook)[mask.bool()], expected[mask.bool()])


def test_a_splice_replaces_the_activation_downstream(tiny, minilm):
    """TransformerLens's own run_with_hooks gives the same logits; on MiniLM, replacing the last block's output
    changes the last hidden state by exactly the replacement."""
    tokens, _ = _tokens(tiny, rows=1)
    mask = torch.ones_like(tokens)

    def double(x):
        return 2 * x

    with torch.no_grad():
        expected = tiny.model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: 2 * x)])
        with hooked(tiny, "blocks.0.hook_mlp_out", double):
            got = tiny.model(tokens)
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, tiny.model(tokens))
        tokens, mask = _tokens(minilm)
        clean = minilm.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        with hooked(minilm, "blocks.5.hook_resid_post", lambda x: x + 1.0):
            shifted = minilm.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(shifted, clean + 1.0)


def test_a_hook_the_model_lacks_is_one_line(tiny, minilm):
    with pytest.raises(ConfigError, match=r"the SAE reads 'blocks.0.hook_nowhere', which tiny-gpt2 has no hook "
                                          r"named; see its hook_dict"):
        read_hook(tiny, torch.tensor([[1]]), torch.tensor([[1]]), "blocks.0.hook_nowhere")
    with pytest.raises(ConfigError, match=r"the SAE reads 'blocks.7.hook_resid_pre', which the HFModel back end "
                                          r"cannot reach; it reaches blocks.L.hook_resid_pre, "
                                          r"blocks.L.hook_resid_post, blocks.L.hook_mlp_out, blocks.L.mlp.hook_post "
                                          r"for L < 6"):
        read_hook(minilm, torch.tensor([[1]]), torch.tensor([[1]]), "blocks.7.hook_resid_pre")


# --- the buffer ------------------------------------------------------------------------------------------


def fake_stream(n_contexts: int = 40, seed: int = 0) -> list[StreamContext]:
    """Contexts of 3..20 tokens (BOS first), whose row `i` has the activation (ctx_id, i, 1)."""
    g = np.random.default_rng(seed)
    out, row = [], 0
    for place in range(n_contexts):
        tokens = np.arange(int(g.integers(3, 21)))
        out.append(StreamContext(place, 1000 + place, row, tokens, 1))
        row += len(tokens) - 1
    return out


def fake_rows(contexts: list[StreamContext]) -> list[torch.Tensor]:
    return [torch.stack([torch.full((c.n_rows,), float(c.ctx_id)), torch.arange(c.n_rows, dtype=torch.float32),
                         torch.ones(c.n_rows)], dim=1) for c in contexts]


def batches_of(stream, world: int, capacity=64, batch=16, steps=20, resume_at: int | None = None):
    """Per step, the global batch's ids and every worker's rows; with `resume_at`, each worker's buffer is
    rebuilt at that step from the plan alone, as a resumed job does."""
    plan = ShufflePlan(iter(stream), capacity, batch, seed=3, steps=steps)
    buffers = [ActivationBuffer(fake_rows, Shard(r, world), 3) for r in range(world)]
    out = []
    for step, (added, ids) in enumerate(plan):
        if resume_at is not None and step < resume_at:
            continue
        for b in buffers:
            b.add(plan.live, keep=plan.pending()) if step == resume_at else b.add(added)
            assert len(b) <= capacity + 20  # the buffer holds at most `capacity` rows and one context
        out.append((ids, [b.take(ids) for b in buffers]))
    return out


def test_buffer_batches_are_independent_of_workers_and_of_resuming():
    stream = fake_stream()
    starts = {c.ctx_id: c.first_row for c in stream}
    one = batches_of(stream, 1)
    seen = torch.cat([ids for ids, _ in one])
    assert len(one) == 20 and len(seen) == 20 * 16 and len(seen.unique()) == len(seen)  # no row twice
    for ids, (rows,) in one:  # each row is the activation of the row id it stands for
        assert torch.equal(torch.tensor([starts[int(c)] for c in rows[:, 0]]) + rows[:, 1].long(), ids)
    assert max(rows[:, 0].max() - rows[:, 0].min() for _, (rows,) in one) > 10  # batches mix far-apart contexts
    for world in (2, 3):
        for (ids, (rows,)), (ids_n, parts) in zip(one, batches_of(stream, world)):
            assert torch.equal(ids, ids_n)
            together = torch.cat(parts)
            assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, rows.tolist()))
            for r, part in enumerate(parts):  # worker r holds the contexts at places ≡ r (mod world)
                assert all((int(c) - 1000) % world == r for c in part[:, 0])
    for world, at in ((1, 7), (2, 12)):
        resumed = batches_of(stream, world, resume_at=at)
        for (ids, (rows,)), (ids_r, parts) in zip(one[at:], resumed):
            assert torch.equal(ids, ids_r)
            assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, rows.tolist()))


def test_stream_covers_each_training_context_once(tmp_path, tiny_model_cfg):
    from ne.data import read_contexts, write_contexts

    cfg = RunConfig(run_dir=str(tmp_path / "run"), model=tiny_model_cfg,
                    data=DataConfig(source="pydoc", n_ctx=16, max_contexts=60, contexts_per_part=7))
    run = RunDir(cfg.run_dir)
    write_contexts(run, cfg, load_model(tiny_model_cfg))
    stream = list(stream_contexts(run, seed=5, holdout_every=4, skip=1))
    everything = [c for p in range(9) for c in read_contexts(run, p)]
    kept = [c for c, out in zip(everything, held_out(np.array([c for c, _ in everything]), 4)) if not out]
    assert sorted(c.ctx_id for c in stream) == [c for c, _ in kept] and len(kept) == 45
    assert [c.ctx_id for c in stream] != sorted(c.ctx_id for c in stream)  # shuffled
    assert [c.first_row for c in stream] == list(np.cumsum([0] + [c.n_rows for c in stream[:-1]]))
    assert stream_rows(run, 4, 1) == sum(c.n_rows for c in stream) == sum(len(t) - 1 for _, t in kept)
    assert [c.ctx_id for c in stream_contexts(run, 5, 4, 1)] == [c.ctx_id for c in stream]  # seeded


# --- the architectures ------------------------------------------------------------------------------------


def random_sae(arch: str, d: int = 12, m: int = 40, seed: int = 0) -> LMSAE:
    g = torch.Generator().manual_seed(seed)
    sae = LMSAE(d, m, arch, k=5, generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(m, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.3)
        if sae.threshold is not None:
            sae.threshold.copy_(torch.rand(m, generator=g) * 0.2)
    return sae


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saved_sae_loads_in_sae_lens_with_the_same_latents(tmp_path, arch):
    """The activation scale is folded into the saved weights: SAELens reads raw activations and gives the
    latents, reconstructions and neuron embeddings the SAE has on the scaled ones."""
    sae, scale = random_sae(arch), 2.5
    x = torch.randn(50, 12) * 3
    for name, data in saelens_files(sae, scale, "blocks.1.hook_resid_pre", "tiny", 32, True, "pydoc").items():
        (tmp_path / name).write_bytes(data)
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert loaded.cfg.architecture() == arch and loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    with torch.no_grad():
        f = sae.encode(x * scale)
        naive = (x * scale - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        if arch == "topk":
            naive = torch.where(naive >= naive.topk(5, dim=1).values[:, -1:], naive.relu(), 0.0)
        elif arch == "jumprelu":
            naive = torch.where(naive > sae.threshold, naive, 0.0)
        else:
            naive = naive.relu()
        torch.testing.assert_close(f, naive)
        torch.testing.assert_close(loaded.encode(x), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.decode(f), sae.decode(f) / scale, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.process_sae_in(x) * loaded.W_enc[:, 3], sae.embeddings(x * scale, 3),
                                   atol=1e-5, rtol=1e-5)
    assert (f > 0).sum(1).max() == 5 if arch == "topk" else True


def test_jumprelu_gradients_are_sae_lens_straight_through_estimators():
    from sae_lens.saes.jumprelu_sae import JumpReLU, Step

    sae = random_sae("jumprelu")
    x = torch.randn(30, 12)
    cfg = LMSAEConfig(architecture="jumprelu", l0_coeff=0.7)
    pre = sae.pre_acts(x)
    loss = (sae.activate(pre) ** 2).sum() + sae.sparsity(pre, sae.activate(pre), 30, cfg)
    loss.backward()
    ours = sae.threshold.grad.clone()
    sae.threshold.grad = None
    pre = sae.pre_acts(x)
    theirs = (JumpReLU.apply(pre, sae.threshold, 0.05, False) ** 2).sum() + 0.7 * Step.apply(
        pre, sae.threshold, 0.05, False).sum() / 30
    theirs.backward()
    torch.testing.assert_close(ours, sae.threshold.grad)


# --- training --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_cfg):
    """A run directory holding the tokenised corpus (48 contexts of 32 tokens) of the tiny model."""
    from ne.data import write_contexts

    cfg = tiny_run_cfg(str(tmp_path_factory.mktemp("corpus") / "run"), tiny_model_cfg)
    write_contexts(RunDir(cfg.run_dir), cfg, load_model(tiny_model_cfg))
    return cfg


def tiny_run_cfg(run_dir: str, model_cfg: ModelConfig, **train) -> RunConfig:
    train = {"architecture": "topk", "expansion": 2, "k": 8, "batch_size": 64, "buffer_tokens": 256, **train}
    return RunConfig(run_dir=run_dir, model=model_cfg,
                     data=DataConfig(source="pydoc", n_ctx=32, max_contexts=48, contexts_per_part=8),
                     harvest=HarvestConfig(k=8, frac=0.5, batch_size=8, num_workers=0),
                     sae=UnitsSAEConfig(train_hook="blocks.1.hook_resid_pre", train=LMSAEConfig(**train),
                                        trainer=SAETrainerConfig(num_workers=0, checkpoint_every=3)))


def train_tiny(cfg: RunConfig, model, steps=12, **kwargs):
    return train_sae(model, RunDir(cfg.run_dir), cfg.sae.train_hook, cfg.sae.train, cfg.sae.eval.holdout_every,
                     cfg.seed, steps, **kwargs)


def test_training_resumes_to_the_same_weights_and_the_ne_loss_starts_late(tiny_run, tiny):
    saved: list[TrainState] = []
    cfg = dataclasses.replace(tiny_run, sae=dataclasses.replace(
        tiny_run.sae, train=dataclasses.replace(tiny_run.sae.train, loss="ne", ne_start=0.5)))
    sae, final = train_tiny(cfg, tiny, steps=8, checkpoint=saved.append, checkpoint_every=4)
    assert [s.step for s in saved] == [4] and final.step == 8 and final.summary()["l0"] == 8.0
    resumed, again = train_tiny(cfg, tiny, steps=8, state=TrainState.from_dict(saved[0].to_dict()))
    assert again.resumed_from == 4 and again.sums == pytest.approx(final.sums, rel=1e-5)
    for k, v in sae.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=1e-5)
    # Until the NE loss switches on (step 4 of 8), it only tracks its averages: the standard SAE takes the same
    # steps, from the same initialisation on the same batches.
    plain = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, train=dataclasses.replace(cfg.sae.train,
                                                                                                  loss="none")))
    _, last = train_tiny(plain, tiny, steps=8, checkpoint=saved.append, checkpoint_every=4)
    assert torch.equal(saved[0].sae["W_enc"], saved[1].sae["W_enc"])
    assert final.sums[2] > 0 and last.sums[2] == 0 and not torch.equal(final.sae["W_enc"], last.sae["W_enc"])


# --- bad input -------------------------------------------------------------------------------------------


def test_bad_settings_are_one_line_errors(tiny_run, tiny, tmp_path):
    from jobs.harvest import run_harvest
    from jobs.lm_sae import planned_steps

    for key, value, message in [
        ("expansion", 0, r"sae.train.expansion is 0; it must be at least 1"),
        ("k", 0, r"sae.train.k is 0; it must be at least 1"),
        ("buffer_tokens", 32, r"sae.train.buffer_tokens \(32\) is smaller than sae.train.batch_size \(64\): the "
                              r"buffer must hold a whole batch"),
        ("ne_start", 1.0, r"sae.train.ne_start is 1.0; it is a fraction of the steps in \[0, 1\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            LMSAEConfig(**{"batch_size": 64, key: value})
    with pytest.raises(ConfigError, match=r"sae.eval.holdout_every is 1, which holds out every context"):
        LMSAEEvalConfig(holdout_every=1)
    with pytest.raises(ConfigError, match=r"sae.compare.seeds is set but sae.compare.ne_coeffs is empty"):
        SAECompareConfig(seeds=[0])
    with pytest.raises(ConfigError, match=r"sae.train.k is 200 but the SAE has only 128 latents \(expansion 2 × 64, "
                                          r"the width of blocks.1.hook_resid_pre\); lower k or raise expansion"):
        LMSAEConfig(architecture="topk", expansion=2, k=200).check_width(64, "blocks.1.hook_resid_pre")
    long = tiny_run_cfg(tiny_run.run_dir, tiny_run.model, train_tokens=10**6)
    with pytest.raises(DataError, match=r"sae.train.train_tokens is 1,000,000 but the corpus gives 1,3\d\d training "
                                        r"tokens \(BOS excluded"):
        planned_steps(RunDir(tiny_run.run_dir), long, tiny)
    lacking = dataclasses.replace(tiny_run, run_dir=str(tmp_path / "run"),
                                  sae=dataclasses.replace(tiny_run.sae, train_hook="blocks.1.hook_nothing"))
    with pytest.raises(ConfigError, match=r"^sae.train_hook is 'blocks.1.hook_nothing', which tiny-gpt2 has no hook "
                                          r"named"):
        run_harvest(lacking)
    from ne.lm_sae.train import hook_width

    with pytest.raises(ConfigError, match=r"sae.train_hook is 'blocks.0.attn.hook_q', whose activations have shape "
                                          r"\[batch, pos, 4, 16\] in tiny-gpt2; an SAE reads one vector per token"):
        hook_width(tiny, "blocks.0.attn.hook_q")


# --- evaluation ------------------------------------------------------------------------------------------


def test_evaluation_against_naive_computations(tmp_path, tiny, minilm):
    from ne.lm_sae.eval import evaluate_sae

    sae, scale = random_sae("topk", d=64, m=96), 0.5
    for name, data in saelens_files(sae, scale, "blocks.1.hook_resid_pre", "tiny", 32, True, "pydoc").items():
        (tmp_path / name).write_bytes(data)
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path))
    tokens, mask = _tokens(tiny)
    contexts = [(i, t[: int(m.sum())].numpy()) for i, (t, m) in enumerate(zip(tokens, mask))]

    def logits(tokens, mask):
        return tiny.model(tokens, attention_mask=None if bool(mask.all()) else mask)

    got = evaluate_sae(tiny, logits, "ce", loaded, "blocks.1.hook_resid_pre", iter(contexts), 10**6, 1, 0.3)
    xs, ce_clean, ce_spliced = [], [], []
    with torch.no_grad():
        for _, t in contexts:
            t = torch.as_tensor(t)[None]
            _, cache = tiny.model.run_with_cache(t, names_filter=["blocks.1.hook_resid_pre"])
            x = cache["blocks.1.hook_resid_pre"][0]
            xs.append(x[1:])
            recon = loaded.decode(loaded.encode(x))

            def splice(act, hook, recon=recon):
                return torch.cat([act[:, :1], recon[None, 1:]], dim=1)

            ce_clean.append(tiny.model(t, return_type="loss", loss_per_token=True)[0])
            ce_spliced.append(tiny.model.run_with_hooks(t, return_type="loss", loss_per_token=True,
                                                        fwd_hooks=[("blocks.1.hook_resid_pre", splice)])[0])
        x = torch.cat(xs)
        f = loaded.encode(x)
        err = (loaded.decode(f) - x).square().sum()
    assert got.tokens == len(x) == int(mask.sum()) - 2
    assert got.mse == pytest.approx(float(err / x.numel()), rel=1e-4)
    assert got.fvu == pytest.approx(float(err / (x - x.mean(0)).square().sum()), rel=1e-4)
    assert got.l0 == pytest.approx(5.0)
    assert got.dead_pct == pytest.approx(100 * float(((f > 0).sum(0) == 0).float().mean()))
    assert got.dense_pct == pytest.approx(100 * float(((f > 0).float().mean(0) > 0.3).float().mean()))
    assert got.ce_clean == pytest.approx(float(torch.cat(ce_clean).mean()), rel=1e-4)
    assert got.ce_increase == pytest.approx(float(torch.cat(ce_spliced).mean() - torch.cat(ce_clean).mean()), rel=1e-3,
                                            abs=1e-4)
    assert got.ce_increase > 0.01 and math.isnan(got.cosine)
    rows = loaded.W_enc.detach().T  # one encoder row per latent
    assert got.enc_dims == pytest.approx(float(np.median([float(w.square().sum() ** 2 / (w**4).sum()) for w in rows])),
                                         rel=1e-5)

    # MiniLM: the sentence embedding, spliced at the last block's output, is the mean of the rows replaced.
    from ne.lm_sae.eval import downstream_model

    model, sentence, kind = downstream_model(MINILM)
    sae = random_sae("standard", d=384, m=64)
    for name, data in saelens_files(sae, 1.0, "blocks.5.hook_resid_post", "minilm", 32, True, "pydoc").items():
        (tmp_path / name).write_bytes(data)
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path))
    tokens, mask = _tokens(model)
    contexts = [(i, t[: int(m.sum())].numpy()) for i, (t, m) in enumerate(zip(tokens, mask))]
    got = evaluate_sae(model, sentence, kind, loaded, "blocks.5.hook_resid_post", iter(contexts), 10**6, 2, 0.1)
    cosines = []
    with torch.no_grad():
        for _, t in contexts:
            h = model.model(input_ids=torch.as_tensor(t)[None]).last_hidden_state[0]
            spliced = torch.cat([h[:1], loaded.decode(loaded.encode(h[1:]))])
            cosines.append(torch.nn.functional.cosine_similarity(h.mean(0), spliced.mean(0), dim=0))
    assert kind == "cosine" and got.cosine == pytest.approx(float(torch.stack(cosines).mean()), abs=1e-5)
    assert got.cosine < 0.999 and math.isnan(got.ce_increase)


# --- on Ray ----------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_ray_train_resumes_a_killed_job_on_two_workers_to_the_one_process_weights(tmp_path, tiny_model_cfg, tiny,
                                                                                  local_ray, monkeypatch):
    """One job: a worker count the cluster cannot place is refused; one worker, killed after its checkpoint at
    step 3; a restart with changed settings refused through the stage graph; the same settings on two workers
    resume at step 3. The SAE written, read back by SAELens, encodes as the uninterrupted in-process SAE."""
    from jobs.harvest import run_harvest
    from jobs.lm_sae import FAIL_AT

    cfg = tiny_run_cfg(str(tmp_path / "run"), tiny_model_cfg, batch_size=128, loss="ne", ne_start=0.3)

    def with_trainer(cfg, **changes):
        return dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, trainer=dataclasses.replace(
            cfg.sae.trainer, **changes)))

    with pytest.raises(ConfigError, match=r"sae.trainer.num_workers is 3 but the Ray cluster has 2 CPUs; each worker "
                                          r"takes one, so set sae.trainer.num_workers to at most 2"):
        run_harvest(with_trainer(cfg, num_workers=3))
    one = with_trainer(cfg, num_workers=1, max_failures=0)
    monkeypatch.setenv(FAIL_AT, "4")
    with pytest.raises(Exception, match="injected failure at step 6"):
        run_harvest(one)
    monkeypatch.delenv(FAIL_AT)
    run = RunDir(cfg.run_dir)
    assert run.manifest()["stages"]["sae"]["status"] == "running"
    changed = dataclasses.replace(one, sae=dataclasses.replace(one.sae, train=dataclasses.replace(one.sae.train,
                                                                                                 lr=2e-3)))
    with pytest.raises(ConfigError, match=r"^sae.train.lr is 0.002 in this config but was 0.001 when stage 'sae' of "
                                          r".* was interrupted; resume it with the settings it started with, or start "
                                          r"it over with `ne harvest --config CONFIG --force sae`"):
        run_harvest(changed)
    run_harvest(with_trainer(cfg, num_workers=2))
    info = run.manifest()["stages"]["sae"]["info"]
    assert (info["resumed_from"], info["workers"], info["steps"]) == (3, 2, 10)

    sae, state = train_tiny(cfg, tiny, steps=10)  # one process, never interrupted
    loaded = sae_lens.SAE.load_from_disk(run.path("sae"))
    assert loaded.cfg.architecture() == "topk" and loaded.cfg.k == 8
    tokens, mask = _tokens(tiny)
    x = read_hook(tiny, tokens, mask, "blocks.1.hook_resid_pre")[mask.bool()]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x * state.scale), atol=1e-4, rtol=1e-3)
    # The directory written is what sae.path reads: another run's units are its latents.
    from ne.models import units_on

    units = units_on(tiny, dataclasses.replace(cfg, sae=UnitsSAEConfig(path=run.path("sae"))))
    torch.testing.assert_close(units.run(tokens, mask, [1])[1].act[mask.bool()], loaded.encode(x).detach())
    assert info["l_n"] == pytest.approx(state.summary()["l_n"], rel=1e-3) and info["l_n"] > 0


@pytest.mark.ray
def test_ne_run_compares_saes_over_seeds_with_paired_verdicts(tmp_path, tiny_model_cfg, local_ray):
    """`ne run` on a config with sae.compare: one ordinary run per SAE (trained, harvested, clustered and
    evaluated), then the table, the CSV of every run and the plot."""
    import json

    import yaml

    from ne.cli import main
    from ne.config import to_dict

    cfg = tiny_run_cfg(str(tmp_path / "cmp"), tiny_model_cfg, loss="none")
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, compare=SAECompareConfig(seeds=[0, 1],
                                                                                             ne_coeffs=[2.0])))
    (tmp_path / "cmp.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["run", "--config", str(tmp_path / "cmp.yaml")]) == 0
    root = tmp_path / "cmp"
    rows = {line.split(",")[0]: line.split(",") for line in (root / "comparison.csv").read_text().splitlines()}
    header = rows.pop("run")
    assert set(rows) == {"standard-seed0", "ne2-seed0", "standard-seed1", "ne2-seed1"}
    evals = {name: json.loads((root / name / "sae_eval.json").read_text()) for name in rows}
    for name, row in rows.items():
        for c in ("fvu", "l0", "polysemantic", "raw_polysemantic", "enc_dims", "ce_increase"):
            assert float(row[header.index(c)]) == pytest.approx(evals[name][c])
        assert RunDir(str(root / name)).manifest()["stages"]["sae_eval"]["status"] == "done"
    table = (root / "comparison.md").read_text()
    diffs = [evals[f"ne2-seed{s}"]["fvu"] - evals[f"standard-seed{s}"]["fvu"] for s in (0, 1)]
    sem = abs(diffs[0] - diffs[1]) / 2  # the paired standard error of two differences
    assert f"| fvu | {'+' if np.mean(diffs) >= 0 else ''}{np.mean(diffs):.3f} | {sem:.3f} |" in table
    assert "ne2 against standard, paired by seed" in table and "held-out tokens" in table
    assert (root / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_the_sae_stage_records_only_settings_that_change_the_sae():
    from ne.stages import GRAPH, settings_of

    base = tiny_run_cfg("run", MINILM)  # TopK, no NE loss

    def recorded(**train):
        sae = dataclasses.replace(base.sae, train=dataclasses.replace(base.sae.train, **train))
        return settings_of(dataclasses.replace(base, sae=sae), GRAPH["sae"].settings)

    assert recorded(ne_coeff=5.0) == recorded(l1_coeff=0.5) == recorded(contexts_per_batch=3) == recorded()
    assert recorded(k=4) != recorded() != recorded(loss="ne") != recorded(loss="ne", ne_coeff=5.0)
    assert recorded(architecture="standard", l1_coeff=0.5) != recorded(architecture="standard")


def test_configs_load_strictly():
    from ne.config import load_config
    from tests.conftest import REPO

    for name in ("lm-sae.yaml", "lm-sae-gpt2.yaml", "sae-demo.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.sae.train_hook
    assert load_config(REPO / "configs" / "lm-sae.yaml").sae.compare.active
