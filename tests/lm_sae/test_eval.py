"""The SAE's evaluation against naive computations: reconstruction, sparsity, and the splice's cost."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason='the SAE tests need sae-lens: pip install -e ".[test]"')

from ne.compute.lm_sae import saelens_files  # noqa: E402
from tests.conftest import MINILM  # noqa: E402
from tests.lm_sae.common import random_sae, sample_tokens  # noqa: E402

torch.set_num_threads(1)  # small tensors: one thread is as fast, and stays fast on a busy machine


def test_evaluation_against_naive_computations(tmp_path, tiny):
    from ne.lm_sae.eval import evaluate_sae

    sae, scale = random_sae("topk", d=64, m=96), 0.5
    for name, data in saelens_files(sae, scale, "blocks.1.hook_resid_pre", "tiny", 32, True, "pydoc").items():
        (tmp_path / name).write_bytes(data)
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path))
    tokens, mask = sample_tokens(tiny)
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
            ce_spliced.append(
                tiny.model.run_with_hooks(
                    t, return_type="loss", loss_per_token=True, fwd_hooks=[("blocks.1.hook_resid_pre", splice)]
                )[0]
            )
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
    assert got.ce_increase == pytest.approx(
        float(torch.cat(ce_spliced).mean() - torch.cat(ce_clean).mean()), rel=1e-3, abs=1e-4
    )
    assert got.ce_increase > 0.01 and math.isnan(got.cosine)
    rows = loaded.W_enc.detach().T  # one encoder row per latent
    assert got.enc_dims == pytest.approx(
        float(np.median([float(w.square().sum() ** 2 / (w**4).sum()) for w in rows])), rel=1e-5
    )

    # MiniLM: the sentence embedding, spliced at the last block's output, is the mean of the rows replaced.
    from ne.lm_sae.eval import downstream_model

    model, sentence, kind = downstream_model(MINILM)
    sae = random_sae("standard", d=384, m=64)
    for name, data in saelens_files(sae, 1.0, "blocks.5.hook_resid_post", "minilm", 32, True, "pydoc").items():
        (tmp_path / name).write_bytes(data)
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path))
    tokens, mask = sample_tokens(model)
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
