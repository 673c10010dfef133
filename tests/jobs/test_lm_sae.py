"""The LM-SAE job on Ray Train: a killed job resumed on two workers, and `ne run` comparing SAEs over seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason='the SAE tests need sae-lens: pip install -e ".[test]"')

from ne.config import UnitsSAEConfig  # noqa: E402
from ne.errors import ConfigError  # noqa: E402
from ne.lm_sae.config import SAECompareConfig  # noqa: E402
from ne.models.hooks import read_hook  # noqa: E402
from ne.rundir.store import RunDir  # noqa: E402
from tests.lm_sae.common import sample_tokens, tiny_run_cfg, train_tiny  # noqa: E402


@pytest.mark.ray
def test_ray_train_resumes_a_killed_job_on_two_workers_to_the_one_process_weights(
    tmp_path, tiny_model_cfg, tiny, local_ray, monkeypatch
):
    """One job: a worker count the cluster cannot place is refused; one worker, killed after its checkpoint at
    step 3; a restart with changed settings refused through the stage graph; the same settings on two workers
    resume at step 3. The SAE written, read back by SAELens, encodes as the uninterrupted in-process SAE."""
    from jobs.harvest import run_harvest
    from jobs.lm_sae import FAIL_AT

    cfg = tiny_run_cfg(str(tmp_path / "run"), tiny_model_cfg, batch_size=128, loss="ne", ne_start=0.3)

    def with_trainer(cfg, **changes):
        return dataclasses.replace(
            cfg, sae=dataclasses.replace(cfg.sae, trainer=dataclasses.replace(cfg.sae.trainer, **changes))
        )

    with pytest.raises(
        ConfigError,
        match=r"^sae.trainer.num_workers is 3 but the Ray cluster has 2 CPUs, one per "
        r"worker; set sae.trainer.num_workers to at most 2$",
    ):
        run_harvest(with_trainer(cfg, num_workers=3))
    one = with_trainer(cfg, num_workers=1, max_failures=0)
    monkeypatch.setenv(FAIL_AT, "4")
    with pytest.raises(Exception, match="injected failure at step 6"):
        run_harvest(one)
    monkeypatch.delenv(FAIL_AT)
    run = RunDir(cfg.run_dir)
    assert run.manifest()["stages"]["sae"]["status"] == "running"
    changed = dataclasses.replace(
        one, sae=dataclasses.replace(one.sae, train=dataclasses.replace(one.sae.train, lr=2e-3))
    )
    with pytest.raises(
        ConfigError,
        match=r"^sae.train.lr is 0.002 in this config but was 0.001 when stage 'sae' of "
        r".* was interrupted; resume it with the settings it started with, or start "
        r"it over with `ne harvest --config CONFIG --force sae`",
    ):
        run_harvest(changed)
    run_harvest(with_trainer(cfg, num_workers=2))
    info = run.manifest()["stages"]["sae"]["info"]
    assert (info["resumed_from"], info["workers"], info["steps"]) == (3, 2, 10)

    sae, state = train_tiny(cfg, tiny, steps=10)  # one process, never interrupted
    loaded = sae_lens.SAE.load_from_disk(run.path("sae"))
    assert loaded.cfg.architecture() == "topk" and loaded.cfg.k == 8
    tokens, mask = sample_tokens(tiny)
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
    cfg = dataclasses.replace(
        cfg, sae=dataclasses.replace(cfg.sae, compare=SAECompareConfig(seeds=[0, 1], ne_coeffs=[2.0]))
    )
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
