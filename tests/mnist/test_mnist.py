"""MNIST IDX reading, normalisation, the MLP and its weights files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ne.compute.parallel import build_optimizer
from ne.errors import ConfigError, DataError
from ne.mnist import data as mnist_data
from ne.mnist import model as mnist_model
from ne.mnist.config import MLPConfig
from ne.mnist.model import load_sae
from ne.rundir import store
from tests.conftest import require_shared

torch.set_num_threads(1)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written from the format's definition: 0, 0, type 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_dir(folder, n_train=20, n_test=10, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data[split] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        for kind, arr in zip(("images", "labels"), data[split]):
            name = mnist_data.FILES[(split, kind)]
            raw = idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_reads_gz_and_raw(tmp_path, gz):
    data = write_mnist_dir(tmp_path, gz=gz)
    for split in ("train", "test"):
        got = mnist_data.load_idx(str(tmp_path), split)
        images, labels = data[split]
        assert got.images.dtype == torch.uint8 and got.images.shape == (len(labels), 784)
        np.testing.assert_array_equal(got.images.numpy(), images.reshape(len(labels), 784))
        np.testing.assert_array_equal(got.labels.numpy(), labels)


def test_scale_pixels_matches_formula():
    x = torch.tensor([[0, 1, 128, 255]], dtype=torch.uint8)
    expected = [[(v / 255 - 0.1307) / 0.3081 for v in (0, 1, 128, 255)]]
    np.testing.assert_allclose(mnist_data.scale_pixels(x).numpy(), expected, rtol=1e-6)


def test_missing_directory_names_it(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist.*data.dir"):
        mnist_data.load_idx(str(tmp_path / "nowhere"), "train")


def test_missing_file_names_it(tmp_path):
    write_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        mnist_data.load_idx(str(tmp_path), "test")


def test_wrong_magic_number(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x03" + idx_bytes(np.zeros((1, 28, 28)))[4:])
    with pytest.raises(DataError, match="magic number 0x00000d03"):
        mnist_data.read_idx(str(path))


def test_truncated_raw_and_gz(tmp_path):
    raw = idx_bytes(np.zeros((3, 28, 28)))
    (tmp_path / "a").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        mnist_data.read_idx(str(tmp_path / "a"))
    (tmp_path / "b").write_bytes(raw[:9])
    with pytest.raises(DataError, match="truncated inside its header"):
        mnist_data.read_idx(str(tmp_path / "b"))
    (tmp_path / "c.gz").write_bytes(gzip.compress(raw)[:-30])
    with pytest.raises(DataError, match="damaged gzip"):
        mnist_data.read_idx(str(tmp_path / "c.gz"))


def test_from_hf_converts_pil_rows():
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in arrays], "label": [3, 1, 4]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
    )
    split = mnist_data.from_hf(ds)
    np.testing.assert_array_equal(split.images.numpy(), arrays.reshape(3, 784))
    assert split.labels.tolist() == [3, 1, 4]


def test_mlp_matches_formula_and_round_trips(tmp_path):
    model = mnist_model.MLP(16, torch.Generator().manual_seed(0))
    x = torch.randn(5, 784)
    expected = torch.relu(x @ model.W1.T + model.b1) @ model.W2.T + model.b2
    torch.testing.assert_close(model(x), expected)
    path = tmp_path / "mlp.safetensors"
    path.write_bytes(store.tensors_bytes(model))
    again = mnist_model.MLP.load(str(path))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)


def test_bad_weights_files(tmp_path):
    good = {"W1": torch.zeros(8, 784), "b1": torch.zeros(8), "W2": torch.zeros(10, 8), "b2": torch.zeros(10)}
    save_file({**good, "extra": torch.zeros(1)}, str(tmp_path / "names.safetensors"))
    with pytest.raises(DataError, match="expected exactly \\['W1', 'W2', 'b1', 'b2'\\]"):
        mnist_model.MLP.load(str(tmp_path / "names.safetensors"))
    save_file({**good, "W1": torch.zeros(8, 783)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(DataError, match="W1 has shape \\[8, 783\\], expected \\[None, 784\\]"):
        mnist_model.MLP.load(str(tmp_path / "shape.safetensors"))
    save_file({**good, "b1": torch.zeros(9)}, str(tmp_path / "hidden.safetensors"))
    with pytest.raises(DataError, match="disagree on the hidden width"):
        mnist_model.MLP.load(str(tmp_path / "hidden.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a readable safetensors"):
        mnist_model.MLP.load(str(tmp_path / "junk.safetensors"))
    with pytest.raises(DataError, match="does not exist"):
        mnist_model.MLP.load(str(tmp_path / "absent.safetensors"))


def test_training_is_deterministic_and_learns():
    rng = np.random.default_rng(1)
    # A learnable toy task: the label is which of 10 pixel blocks is brightest.
    labels = rng.integers(0, 10, 600)
    images = rng.integers(0, 60, (600, 784))
    for i, y in enumerate(labels):
        images[i, y * 78 : y * 78 + 78] += 180
    split = mnist_data.MnistSplit(torch.tensor(images, dtype=torch.uint8), torch.tensor(labels))
    cfg = MLPConfig(hidden=16, batch_size=32, optimizer="sgd", lr=0.05)

    def train(seed):
        model = mnist_model.MLP(16, torch.Generator().manual_seed(seed))
        opt = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
        losses = [mnist_model.train_mlp_epoch(model, opt, split, cfg, seed, e) for e in range(2)]
        return model, losses

    a, losses = train(0)
    b, _ = train(0)
    c, _ = train(1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.W1, c.W1)
    assert losses[1] < losses[0] < np.log(10)
    assert mnist_model.accuracy(a, split) > 0.9


def test_weight_decay_shrinks_the_spread_on_blank_pixels():
    """Every image is 0 on a blank pixel, so each hidden unit's weights on the blank pixels get one shared
    gradient: with SGD only the decay changes their spread, by exactly (1 - lr × wd) per step. This is the
    measurement behind `mlp.weight_decay` (the authors' MLP keeps 6% of the initial spread)."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, 256)
    images = rng.integers(0, 256, (256, 784))
    blank = np.arange(0, 784, 7)
    images[:, blank] = 0
    split = mnist_data.MnistSplit(torch.tensor(images, dtype=torch.uint8), torch.tensor(labels))

    def spread(model):
        w = model.W1.detach()[:, blank].double()
        return (w - w.mean(1, keepdim=True)).std()

    for wd in (0.0, 0.3):
        cfg = MLPConfig(hidden=8, batch_size=32, optimizer="sgd", lr=0.05, weight_decay=wd)
        model = mnist_model.MLP(8, torch.Generator().manual_seed(0))
        before = spread(model)
        mnist_model.train_mlp_epoch(model, mnist_model.mlp_optimizer(model, cfg), split, cfg, 0, 0)
        assert float(spread(model) / before) == pytest.approx((1 - 0.05 * wd) ** 8, rel=1e-4)
    with pytest.raises(ConfigError, match="mlp.weight_decay is -0.5; it must be >= 0"):
        MLPConfig(weight_decay=-0.5)


def test_real_mnist_and_authors_mlp():
    data = require_shared("mnist")
    test = mnist_data.load_idx(str(data), "test")
    assert test.images.shape == (10_000, 784) and test.labels.bincount().tolist()[1] == 1135
    weights = require_shared("mechmnistic") / "mlp.safetensors"
    model = mnist_model.MLP.load(str(weights))
    assert model.hidden_size == 64
    assert mnist_model.accuracy(model, test) == pytest.approx(0.9399, abs=1e-4)  # the README's 93.99%


@pytest.mark.parametrize("command", ["train", "sae-eval"])
def test_labels_outside_0_to_9_are_one_line_errors(tmp_path, command, capsys):
    from ne.cli import main

    write_mnist_dir(tmp_path)
    labels = np.arange(20) % 10
    labels[7] = 11
    (tmp_path / f"{mnist_data.FILES[('train', 'labels')]}.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataError, match=r"train labels: label 11 at index 7 \(1 such\) lies outside 0..9"):
        mnist_data.load_idx(str(tmp_path), "train")
    args = [
        command,
        "--set",
        f"data.dir={tmp_path}",
        "--set",
        f"run_dir={tmp_path / 'run'}",
        "--set",
        "sae.ne_start_step=0",
    ]
    if command == "sae-eval":
        args += ["--weights", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "label 11 at index 7" in err


def test_figure_with_an_unknown_model_lists_the_valid_ones(capsys):
    from ne.cli import main

    assert main(["figure", "--model", "bogus", "--neuron", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "ne figure: error: --model 'bogus' is not a model of the MNIST run; choose one of mlp, "
        "sae_standard, sae_ne_loss"
    )


@pytest.mark.parametrize("command", [["sae-eval", "--weights", "WEIGHTS"], ["figure", "--neuron", "1"]])
def test_out_naming_a_file_is_one_line_before_any_work(tmp_path, command, capsys):
    from ne.cli import main

    (tmp_path / "table.md").write_text("keep me")
    args = [a.replace("WEIGHTS", str(tmp_path / "absent")) for a in command]
    for out, where in (
        (tmp_path / "table.md", "is a file"),
        (tmp_path / "table.md" / "sub", f"lies under {str(tmp_path / 'table.md')!r}, which is a file"),
    ):
        assert main([*args, "--out", str(out), "--set", f"run_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [
            f"ne {command[0]}: error: --out {str(out)!r} {where}; give a directory (it is created when missing)"
        ]
    assert (tmp_path / "table.md").read_text() == "keep me"


def test_sae_load_checks_names_and_shapes(tmp_path):
    good = {"W_enc": torch.zeros(16, 4), "b_enc": torch.zeros(16), "W_dec": torch.zeros(4, 16), "b_dec": torch.zeros(4)}
    save_file({k.lower(): v for k, v in good.items()}, str(tmp_path / "names.safetensors"))
    with pytest.raises(DataError, match="expected exactly \\['W_dec', 'W_enc', 'b_dec', 'b_enc'\\]"):
        load_sae(str(tmp_path / "names.safetensors"))
    save_file(good, str(tmp_path / "ok.safetensors"))
    assert load_sae(str(tmp_path / "ok.safetensors"), 4).n_neurons == 16
    with pytest.raises(DataError, match="W_enc has shape \\[16, 4\\], expected \\[None, 64\\]"):
        load_sae(str(tmp_path / "ok.safetensors"), 64)
    save_file({**good, "W_dec": torch.zeros(4, 15)}, str(tmp_path / "dec.safetensors"))
    with pytest.raises(DataError, match="disagree"):
        load_sae(str(tmp_path / "dec.safetensors"))


def test_authors_saes_load():
    folder = require_shared("mechmnistic")
    for name in ("sae_standard", "sae_ne_loss"):
        sae = load_sae(str(folder / f"{name}.safetensors"), 64)
        assert sae.W_enc.shape == (512, 64) and sae.W_dec.shape == (64, 512)
