"""ne/config.py: strict YAML configs; every bad value gets a one-line error naming it."""

import re
from pathlib import Path

import pytest
import yaml

from ne.cli import main
from ne.config import RunConfig, load_config
from ne.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


LM_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("mnist"))


@pytest.mark.parametrize("name", LM_CONFIGS)
def test_shipped_configs_load(name):
    assert isinstance(load_config(REPO / "configs" / name), RunConfig)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"harvest": {"kk": 3}}, "unknown config key 'harvest.kk'"),
        ({"modle": {}}, "unknown config key 'modle'"),
        ({"harvest": {"frac": 0}}, "harvest.frac is 0.0; it must lie in (0, 1]"),
        ({"harvest": {"frac": 1.5}}, "harvest.frac is 1.5"),
        ({"harvest": {"k": 0}}, "harvest.k is 0; it must be at least 1"),
        ({"harvest": {"k": "ten"}}, "harvest.k must be of type int, got 'ten'"),
        ({"model": {"backend": "onnx"}}, "model.backend is 'onnx'"),
        ({"data": {"source": "files"}}, "data.source 'files' needs data.paths"),
        ({"cluster": {"method": "ward"}}, "cluster.method is 'ward'; choose one of 'average', 'single', 'complete'"),
        ({"cluster": {"cut": "gap"}}, "cluster.cut is 'gap'; choose one of 'silhouette', 'fixed'"),
        ({"cluster": {"min_separation": -0.1}}, "cluster.min_separation is -0.1; a cosine distance lies in [0, 2)"),
        ({"cluster": {"min_silhouette": 2}}, "cluster.min_silhouette is 2.0; a silhouette lies in [-1, 1]"),
        ({"cluster": {"silhouette_tolerance": -1}}, "cluster.silhouette_tolerance is -1.0; it must lie in [0, 2]"),
        ({"cluster": {"max_clusters": 1}}, "cluster.max_clusters is 1; it must be at least 2"),
        ({"harvest": {"layers": []}}, "harvest.layers is empty; list the layers to use, e.g. [0, 3], or null"),
        ({"harvest": {"layers": [1, 1]}}, "harvest.layers lists layer 1 more than once ([1, 1]); list each layer once"),
        ({"harvest": {"layers": [-1]}}, "harvest.layers is -1; it must be at least 0"),
        ({"harvest": {"k": 2**70}}, f"harvest.k is {2**70}, beyond a 64-bit integer"),
        ({"harvest": {"k": 40_000}}, "harvest.k is 40000; it must be at most 32,767 (ranks are stored as int16)"),
        ({"seed": -1}, "seed is -1; it must be at least 0 (seeds are non-negative integers)"),
        ({"seed": -1, "index": {"exact_below": 0}}, "seed is -1; it must be at least 0"),
        ({"harvest": {"h_dtype": "int8"}}, "harvest.h_dtype is 'int8'; choose one of 'auto', 'float32', 'float16'"),
        ({"importance": {"window_before": -2}}, "importance.window_before is -2; it must be at least 0"),
    ],
)
def test_bad_values_name_themselves(tmp_path, data, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data))
    assert message in str(err.value)


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["harvest.k=7", "harvest.layers=[0, 2]", "run_dir=s3://b/r"])
    assert cfg.harvest.k == 7 and cfg.harvest.layers == [0, 2] and cfg.run_dir == "s3://b/r"
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, {}), ["harvest.k"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="nowhere.yaml' does not exist"):
        load_config("nowhere.yaml")


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    code = main(["harvest", "--config", str(write(tmp_path, {"harvest": {"frac": 2}}))])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == ["ne harvest: error: harvest.frac is 2.0; it must lie in (0, 1], for example 0.75"]


def test_cli_unknown_model_is_one_line(tmp_path, capsys):
    cfg = {"model": {"backend": "transformer_lens", "name": "gpt2-smal"}}
    assert main(["harvest", "--config", str(write(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gpt2-smal" in err and "gpt2-small" in err


def test_config_files_that_are_not_yaml_text(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"run_dir: x\n\x00\x01\x02")
    with pytest.raises(ConfigError, match=r"bin.yaml' is binary, not YAML text"):
        load_config(tmp_path / "bin.yaml")
    (tmp_path / "latin1.yaml").write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(
        ConfigError,
        match=r"latin1.yaml' is not UTF-8 text \(byte 0xe9 at offset 12\); save it as "
        r"UTF-8",
    ):
        load_config(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match=r"is a directory; give a YAML file"):
        load_config(tmp_path)


def test_literal_choices_are_checked_by_the_loader_and_the_dataclass():
    from ne.config import HarvestConfig, ModelConfig

    with pytest.raises(ConfigError, match="model.dtype is 'fp8'; choose one of 'float32', 'bfloat16', 'float16'"):
        ModelConfig(dtype="fp8")
    with pytest.raises(ConfigError, match="harvest.layers lists layer 2 more than once"):
        HarvestConfig(layers=[2, 0, 2])


def test_a_key_given_twice_is_an_error_naming_it_and_its_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("run_dir: runs/x\nharvest: {k: 10, layers: [0]}\nharvest: {frac: 0.5}\n")
    with pytest.raises(
        ConfigError,
        match=r"dup.yaml' is not valid YAML: key 'harvest' is given twice, at lines 2 "
        r"and 3; keep one",
    ):
        load_config(path)
    path.write_text("harvest:\n  k: 10\n  layers: [0]\n  k: 20\n")  # deeper down too
    with pytest.raises(ConfigError, match=r"key 'k' is given twice, at lines 2 and 4"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set harvest=\{k: 1, k: 2\}: .*key 'k' is given twice, on line 1"):
        load_config(None, ["harvest={k: 1, k: 2}"])
    # still safe_load: merge keys may be overridden, and no Python object is ever built
    path.write_text("base: &b {k: 3, frac: 0.5}\nharvest:\n  <<: *b\n  k: 4\n")
    from ne.config import load_yaml

    assert load_yaml(path)["harvest"] == {"k": 4, "frac": 0.5}
    path.write_text("run_dir: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        load_config(path)


def _float_keys(cls, prefix: str = "") -> list[str]:
    """Every float setting of a config family, found from the dataclasses themselves."""
    import dataclasses
    import typing

    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is list and typing.get_args(tp) == (float,):
            keys.append(prefix + f.name + "[0]")  # a list of floats: its items are checked one by one
        elif float in (tp, *typing.get_args(tp)):
            keys.append(prefix + f.name)
    return keys


@pytest.mark.parametrize("family", ["lm", "mnist"])
def test_nan_and_infinity_are_refused_for_every_float_setting(family):
    from ne.mnist.config import MnistRunConfig

    cls = RunConfig if family == "lm" else MnistRunConfig
    keys = _float_keys(cls)
    assert len(keys) >= 8  # the finder sees them: frac, threshold, lr, l1_coeff...
    for key in keys:
        for value, shown in ((".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")):
            with pytest.raises(ConfigError, match=f"^{re.escape(key)} is {shown}; it must be a finite number$"):
                name, listed = key.removesuffix("[0]"), key.endswith("[0]")
                load_config(None, [f"{name}=[{value}]" if listed else f"{key}={value}"], cls=cls)


@pytest.mark.parametrize(
    "override, problem",
    [
        ("harvest.layers=[0,", "expected the node content, but found '<stream end>'"),
        ("harvest.k=@5", "found character '@' that cannot start any token"),
        ("run_dir=*runs", "found undefined alias 'runs'"),
    ],
)
def test_set_values_yaml_cannot_parse_are_one_line_errors(tmp_path, override, problem, capsys):
    key, raw = override.split("=", 1)
    with pytest.raises(ConfigError, match="quote it to mean text") as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"--set {override}: {raw!r} is not a YAML value ({problem}")
    assert main(["harvest", "--config", str(write(tmp_path, {})), "--set", override]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"ne harvest: error: {err.value}"]
