"""ne/cli.py's main: one line and a known exit code for Ctrl-C and for a reader that closes our output."""

from __future__ import annotations

import pytest
import ray
import yaml

from ne.cli import main
from ne.config import RunConfig, to_dict
from ne.errors import ConfigError
from ne.rundir.store import RunDir
from tests.planted import write_synthetic_run


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """A synthetic run with finished clusters, and its config file: `ne index` on it needs no model and no Ray."""
    from jobs.cluster import run_cluster

    tmp_path = tmp_path_factory.mktemp("cli")
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    write_synthetic_run(cfg.run_dir, d_mlp=8)
    run_cluster(cfg, in_process=True)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return cfg, str(tmp_path / "cfg.yaml")


def test_ctrl_c_is_one_line_exit_130_ray_is_shut_down_and_the_rerun_resumes(clustered, monkeypatch, capsys):
    import index.build

    cfg, config = clustered

    def interrupted(*args, **kwargs):  # Ctrl-C lands while the index is being built
        raise KeyboardInterrupt

    monkeypatch.setattr(index.build, "flat_index", interrupted)
    shut: list[bool] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # as when the job had started or joined Ray
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(True))
    try:
        code = main(["index", "--config", config])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert code == 130 and shut == [True]
    assert capsys.readouterr().err.splitlines() == ["ne index: interrupted; rerun the same command to resume"]
    monkeypatch.undo()
    assert RunDir(cfg.run_dir).manifest()["stages"]["index"]["status"] != "done"
    assert main(["index", "--config", config]) == 0  # the lock was let go: the same command finishes the stage
    assert RunDir(cfg.run_dir).manifest()["stages"]["index"]["status"] == "done"


class _ClosedPipe:
    """stdout after its reader went away (`| head`): every write fails as it does on a real closed pipe."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_output_pipe_ends_quietly(clustered, monkeypatch, capsys):
    cfg, _ = clustered
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    try:
        code = main(["status", cfg.run_dir])
    except BrokenPipeError:
        pytest.fail("BrokenPipeError escaped main() as a traceback")
    assert code == 141 and capsys.readouterr().err == ""


def test_each_command_forces_exactly_the_stages_the_graph_gives_it(capsys):
    """The CLI keeps no stage list of its own: `--force` of each command accepts its stages from GRAPH (`sae`
    included, which `ne harvest` runs) and refuses the others."""
    from ne.cli import RUN_COMMANDS, build_parser
    from ne.rundir.graph import GRAPH, stages_of

    commands = {
        "run": stages_of(*RUN_COMMANDS),
        **{c: stages_of(f"ne {c}") for c in ("harvest", "cluster", "index", "importance", "describe", "train")},
    }
    assert "sae" in commands["run"] and "sae" in commands["harvest"]
    assert set().union(*commands.values()) == set(GRAPH)  # every stage is run by some command
    parser = build_parser()
    for command, stages in commands.items():
        sub = parser._subparsers._group_actions[0].choices[command]
        force = next(a for a in sub._actions if a.dest == "force")
        assert all(name in force.help for name in stages), (command, force.help)
    from ne.rundir.stages import check_force

    assert check_force(["sae"], commands["run"]) == {"sae"}
    with pytest.raises(ConfigError, match="stage 'cluster' is run by `ne cluster`"):
        check_force(["cluster"], commands["harvest"])
