"""The MNIST training job: config, stage fingerprints, and one small Ray Train run (format, skip, resume)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ne.compute.sae import NeuronEmbeddingLoss, SAEConfig, build_sae, sae_optimizer, train_sae_epoch
from ne.config import load_config
from ne.errors import ConfigError
from ne.mnist import data as mnist_data
from ne.mnist import model as mnist_model
from ne.mnist.config import MLPConfig, MnistRunConfig
from ne.rundir import store
from ne.rundir.graph import GRAPH, MNIST_STAGES
from ne.rundir.stages import settings_of
from ne.rundir.store import RunDir
from tests.conftest import REPO, require_shared

CONFIG = REPO / "configs" / "mnist-sae.yaml"
MLP_SHAPES = {"W1": (64, 784), "b1": (64,), "W2": (10, 64), "b2": (10,)}
SAE_SHAPES = {"W_enc": (512, 64), "b_enc": (512,), "W_dec": (64, 512), "b_dec": (64,)}


def test_config_is_strict():
    cfg = load_config(CONFIG, cls=MnistRunConfig)
    assert (cfg.sae.expansion * cfg.mlp.hidden, cfg.sae.ne_start_step, cfg.sae.ne_momentum) == (512, 200, 0.9)
    # The recipe is the default twice over: the YAML file and the dataclasses agree.
    assert cfg.sae == SAEConfig() and cfg.mlp == MLPConfig()
    assert (cfg.sae.optimizer, cfg.sae.weight_decay) == (cfg.mlp.optimizer, cfg.mlp.weight_decay) == ("adam", 0.01)
    with pytest.raises(ConfigError, match="mlp.weight_decay is -1.0; it must be >= 0"):
        load_config(CONFIG, ["mlp.weight_decay=-1.0"], cls=MnistRunConfig)
    with pytest.raises(ConfigError, match="unknown config key 'sae.lamda1'"):
        load_config(CONFIG, ["sae.lamda1=0.1"], cls=MnistRunConfig)
    with pytest.raises(ConfigError, match="sae.ne_examples is 'some'"):
        load_config(CONFIG, ["sae.ne_examples=some"], cls=MnistRunConfig)
    with pytest.raises(ConfigError, match="sae.ne_momentum is 1.0"):
        load_config(CONFIG, ["sae.ne_momentum=1.0"], cls=MnistRunConfig)


def test_settings_follow_what_each_stage_depends_on():
    def settings(c: MnistRunConfig) -> dict:
        return {name: settings_of(c, GRAPH[name].settings) for name in MNIST_STAGES}

    cfg = load_config(CONFIG, cls=MnistRunConfig)
    base = settings(cfg)
    assert settings(replace(cfg, trainer=replace(cfg.trainer, num_workers=2))) == base
    l1 = settings(replace(cfg, sae=replace(cfg.sae, l1_coeff=0.5)))
    assert l1["mnist_mlp"] == base["mnist_mlp"] and l1["mnist_sae_standard"] != base["mnist_sae_standard"]
    for change in ({"ne_coeff": 5.0}, {"ne_aggregate": "neurons"}, {"ne_distance": "euclidean"}):
        ne = settings(replace(cfg, sae=replace(cfg.sae, **change)))
        assert ne["mnist_sae_standard"] == base["mnist_sae_standard"]
        assert ne["mnist_sae_ne_loss"] != base["mnist_sae_ne_loss"]
    for change in ({"weight_decay": 0.0}, {"decoder_norm": "unit"}, {"b_dec_init": "mean"}):
        both = settings(replace(cfg, sae=replace(cfg.sae, **change)))
        assert both["mnist_sae_standard"] != base["mnist_sae_standard"]
        assert both["mnist_sae_ne_loss"] != base["mnist_sae_ne_loss"]
    assert settings(replace(cfg, mlp=replace(cfg.mlp, weight_decay=0.0)))["mnist_mlp"] != base["mnist_mlp"]
    assert settings(replace(cfg, seed=1))["mnist_mlp"] != base["mnist_mlp"]
    assert settings(replace(cfg, data=replace(cfg.data, test_subset=5)))["mnist_eval"] != base["mnist_eval"]


def test_unknown_force_and_a_loss_that_never_starts_are_errors(tmp_path):
    from jobs.train import run_train

    data = require_shared("mnist")
    cfg = load_config(CONFIG, [f"run_dir={tmp_path / 'run'}", f"data.dir={data}"], cls=MnistRunConfig)
    with pytest.raises(
        ConfigError,
        match="--force 'mlp' names no stage; this command's stages are: mnist_mlp, "
        "mnist_sae_standard, mnist_sae_ne_loss, mnist_eval",
    ):
        run_train(cfg, force=["mlp"])
    short = replace(cfg, data=replace(cfg.data, train_subset=2000))
    with pytest.raises(
        ConfigError, match="sae.ne_start_step is 200 but the SAEs train for only 16 steps .*would never switch on"
    ):
        run_train(short)
    assert not (tmp_path / "run").exists()


def library_run(cfg: MnistRunConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The same training, in this process, straight from the library: what one Ray worker must produce."""
    train = mnist_data.load_idx(cfg.data.dir, "train").head(cfg.data.train_subset)
    mlp = mnist_model.MLP(64, torch.Generator().manual_seed(cfg.seed))
    opt = mnist_model.mlp_optimizer(mlp, cfg.mlp)
    for epoch in range(cfg.mlp.epochs):
        mnist_model.train_mlp_epoch(mlp, opt, train, cfg.mlp, cfg.seed, epoch)
    acts = mnist_model.hidden_acts(mlp, train.images)
    out = {"mlp": mlp.state_dict()}
    for kind in ("standard", "ne_loss"):
        sae = build_sae(cfg.sae, acts, torch.Generator().manual_seed(cfg.seed + 1))
        opt = sae_optimizer(sae, cfg.sae)
        ne = NeuronEmbeddingLoss.from_config(512, 64, cfg.sae) if kind == "ne_loss" else None
        train_sae_epoch(sae, opt, acts, cfg.sae, cfg.seed + 1, 0, 0, ne)
        out[f"sae_{kind}"] = sae.state_dict()
    return out


@pytest.mark.ray
def test_ray_train_writes_authors_format_skips_and_resumes(tmp_path, local_ray):
    from jobs.train import run_train

    data = require_shared("mnist")
    cfg = load_config(
        CONFIG,
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.dir={data}",
            "data.train_subset=640",
            "data.test_subset=300",
            "mlp.epochs=1",
            "sae.batch_size=64",
            "sae.ne_start_step=4",
            "trainer.threads_per_worker=1",
        ],
        cls=MnistRunConfig,
    )
    first = run_train(cfg)
    assert first.trained == ["mlp", "sae_standard", "sae_ne_loss"] and first.steps == 10 + 10 + 10
    folder = f"{tmp_path / 'run'}/mnist"
    written = {"mlp": store.read_tensors(f"{folder}/mlp.safetensors", MLP_SHAPES)}
    for name in ("sae_standard", "sae_ne_loss"):
        written[name] = store.read_tensors(f"{folder}/{name}.safetensors", SAE_SHAPES)
    expected = library_run(cfg)
    for model, tensors in expected.items():
        for k, v in tensors.items():
            torch.testing.assert_close(written[model][k], v, atol=1e-5, rtol=1e-4)
    assert not torch.equal(written["sae_standard"]["W_enc"], written["sae_ne_loss"]["W_enc"])
    assert (tmp_path / "run" / "mnist" / "sae_eval.md").read_text().count("\n") == 4

    assert run_train(cfg).trained == []  # everything done: nothing retrained, nothing re-evaluated

    run = RunDir(str(tmp_path / "run"))
    manifest = run.manifest()
    for stage, status in (("mnist_sae_standard", "running"), ("mnist_sae_ne_loss", "running"), ("mnist_eval", "stale")):
        manifest["stages"][stage]["status"] = status  # as `ne train` killed while it trains the SAEs leaves them
    run.write_manifest(manifest)
    (tmp_path / "run" / "mnist" / "sae_ne_loss.safetensors").unlink()
    resumed = run_train(cfg)  # Ray Train restores its latest checkpoint: no step is taken again
    assert resumed.trained == ["sae_standard", "sae_ne_loss"] and resumed.steps == 0
    again = store.read_tensors(f"{folder}/sae_ne_loss.safetensors", SAE_SHAPES)
    for k, v in written["sae_ne_loss"].items():
        assert torch.equal(again[k], v)


def _tiny_mnist(tmp_path) -> list[str]:
    """--set arguments for a run on a 20-image synthetic MNIST written in `tmp_path`."""
    from tests.mnist.test_mnist import write_mnist_dir

    (tmp_path / "mnist").mkdir()
    write_mnist_dir(tmp_path / "mnist")
    return [f"data.dir={tmp_path / 'mnist'}", f"run_dir={tmp_path / 'run'}", "sae.ne_start_step=0"]


def _no_ray_train(monkeypatch):
    """Fail at once where the driver would hand the work to Ray Train (before the change, where it hung or raised
    from inside a worker)."""
    import jobs.train

    def reached(*args, **kwargs):
        raise AssertionError("reached Ray Train: the driver did not check this first")

    monkeypatch.setattr(jobs.train, "_fit", reached)
    return reached


@pytest.mark.ray
@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "trainer.num_workers=8",
            "trainer.num_workers is 8 but the Ray cluster has 2 CPUs, one per worker; set "
            "trainer.num_workers to at most 2",
        ),
        (
            "trainer.use_gpu=true",
            "trainer.use_gpu is true but the Ray cluster has no GPU; set trainer.use_gpu to false",
        ),
    ],
)
def test_workers_the_cluster_cannot_hold_are_one_line_before_any_stage_begins(
    tmp_path, local_ray, monkeypatch, capsys, setting, message
):
    from ne.cli import main

    sets = _tiny_mnist(tmp_path) + [setting, "trainer.threads_per_worker=1"]
    _no_ray_train(monkeypatch)
    assert main(["train", *[a for s in sets for a in ("--set", s)]]) == 2
    assert capsys.readouterr().err.splitlines() == [f"ne train: error: {message}"]
    assert not any(
        name.startswith("mnist_m") or name.startswith("mnist_s")
        for name in RunDir(str(tmp_path / "run")).manifest().get("stages", {})
    )


def test_a_truncated_file_or_an_unreachable_hub_is_one_line_from_the_driver(tmp_path, monkeypatch, capsys):
    import jobs.train
    from ne.cli import main

    sets = _tiny_mnist(tmp_path)
    reached = _no_ray_train(monkeypatch)
    monkeypatch.setattr(jobs.train, "_start_ray", reached, raising=False)
    images = tmp_path / "mnist" / f"{mnist_data.FILES[('train', 'images')]}.gz"
    import gzip

    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))  # the labels are intact
    assert main(["train", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 1
        and "train-images-idx3-ubyte.gz' holds 15596 bytes but its header [20, 28, 28] needs "
        "15696: the file is truncated; download it again"
        in err[0]
    )

    import datasets.config
    import huggingface_hub.constants

    for module in (huggingface_hub.constants, datasets.config):  # offline, as on a cluster without the hub
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    assert main(["train", *[a for s in sets for a in ("--set", s)], "--set", "data.source=hf"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("ne train: error: cannot load the Hugging Face dataset 'ylecun/mnist' (")
    assert err[0].endswith("without the hub, use data.source=idx with data.dir holding the four MNIST IDX files")
