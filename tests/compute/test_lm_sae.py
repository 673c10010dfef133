"""The three LM-SAE architectures against SAELens: saved latents, and JumpReLU's gradients."""

from __future__ import annotations

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason='the SAE tests need sae-lens: pip install -e ".[test]"')

from ne.compute.lm_sae import saelens_files  # noqa: E402
from ne.lm_sae.config import LMSAEConfig  # noqa: E402
from tests.lm_sae.common import random_sae  # noqa: E402


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
        torch.testing.assert_close(
            loaded.process_sae_in(x) * loaded.W_enc[:, 3], sae.embeddings(x * scale, 3), atol=1e-5, rtol=1e-5
        )
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
        pre, sae.threshold, 0.05, False
    ).sum() / 30
    theirs.backward()
    torch.testing.assert_close(ours, sae.threshold.grad)
