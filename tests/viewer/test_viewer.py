"""The viewer: per-neuron reads against whole-table reads, in-page messages for bad runs, and a real browser."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ne import schema
from ne.errors import DataError
from ne.rundir.reader import Example, RunData, SortedParts, _RowGroupCache
from ne.rundir.store import RunDir
from ne.viewer import launch_command, render
from tests.viewer.viewer_run import SILENT

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("NE_ARTIFACTS_DIR", REPO / "tmp" / "artifacts")) / "viewer"


def _full(run: str, kind: str, layer: int):
    return pq.read_table(Path(run) / schema.layer_dir(kind, layer)).to_pandas()


# --- data layer --------------------------------------------------------------------------------------------


def test_neuron_read_matches_whole_tables(lm_run):
    data = RunData(lm_run)
    contexts = pq.read_table(Path(lm_run) / schema.CONTEXTS_DIR).to_pandas().set_index("ctx_id")
    for layer in (0, 1):
        examples, clusters = _full(lm_run, schema.EXAMPLES_DIR, layer), _full(lm_run, schema.CLUSTERS_DIR, layer)
        dendro = _full(lm_run, schema.DENDROGRAMS_DIR, layer)
        for neuron in (1, 17, 200):
            nd = data.neuron(layer, neuron)
            want = examples[examples.neuron == neuron].sort_values("rank")
            assert [e.rank for e in nd.examples] == want["rank"].tolist()
            assert [e.ctx_id for e in nd.examples] == want.ctx_id.tolist()
            assert [e.pos for e in nd.examples] == want.pos.tolist()
            np.testing.assert_allclose([e.act for e in nd.examples], want.act)
            for e, w in zip(nd.examples, want.window):
                np.testing.assert_array_equal(e.window, w)
                np.testing.assert_array_equal(e.tokens, contexts.loc[e.ctx_id, "tokens"])
                assert e.act_at(e.pos) == pytest.approx(e.act)
            cl = clusters[clusters.neuron == neuron].set_index("rank")
            assert [e.cluster for e in nd.examples] == cl.loc[want["rank"], "cluster"].tolist()
            assert [e.is_central for e in nd.examples] == cl.loc[want["rank"], "is_central"].tolist()
            z = np.asarray(dendro[dendro.neuron == neuron].linkage.iloc[0]).reshape(-1, 4)
            np.testing.assert_array_equal(nd.linkage, z)
            assert nd.metrics["neuron"] == neuron and nd.metrics["n_examples"] == len(want)
            for c, members in nd.clusters().items():
                assert members[0].is_central and all(e.cluster == c for e in members)


def test_only_the_neurons_row_groups_are_decoded(tmp_path):
    run = RunDir(str(tmp_path))
    table = pa.table({"neuron": np.repeat(np.arange(40, dtype=np.int32), 5), "x": np.arange(200.0)})
    (tmp_path / "ex").mkdir()
    pq.write_table(table.slice(0, 100), tmp_path / "ex" / "part-00000.parquet", row_group_size=25)
    pq.write_table(table.slice(100), tmp_path / "ex" / "part-00001.parquet", row_group_size=25)
    cache = _RowGroupCache()
    parts = SortedParts(run, "ex", "neuron", cache)
    assert len(parts.groups) == 8
    got = parts.read([7, 33])
    assert got.column("x").to_pylist() == [35.0, 36.0, 37.0, 38.0, 39.0, 165.0, 166.0, 167.0, 168.0, 169.0]
    assert len(cache.tables) == 2, "one row group per neuron, nothing else"
    assert parts.read([1000]).num_rows == 0 and len(cache.tables) == 2


def test_neuron_without_examples_and_unknown_layer(lm_run):
    data = RunData(lm_run)
    nd = data.neuron(*SILENT)
    assert nd.examples == [] and nd.max_act is not None
    assert SILENT[1] not in data.neurons(SILENT[0])
    with pytest.raises(DataError, match="layer 7 is not in"):
        data.neuron(7, 0)


def test_status_messages_for_bad_run_dirs(lm_run, tmp_path):
    assert RunData(lm_run).status().errors == []
    assert "does not exist" in RunData(str(tmp_path / "nope")).status().errors[0]
    (tmp_path / "empty").mkdir()
    assert "no manifest.json" in RunData(str(tmp_path / "empty")).status().errors[0]

    half = tmp_path / "half"
    shutil.copytree(lm_run, half)
    set_status(half, "examples", "running")
    assert re.search(r"stage 'examples' of .* is running", RunData(str(half)).status().errors[0])

    broken = tmp_path / "broken"
    shutil.copytree(lm_run, broken)
    part = broken / schema.layer_dir(schema.EXAMPLES_DIR, 0) / schema.part_name(0)
    part.write_bytes(part.read_bytes()[: len(part.read_bytes()) // 2])
    with pytest.raises(DataError, match="part-00000.parquet has .* bytes .* truncated.*redo stage 'examples'"):
        RunData(str(broken)).neuron(0, 1)


def set_status(path, stage: str, status: str) -> None:
    """Edit the manifest as an interrupted job would leave it."""
    run = RunDir(str(path))
    m = run.manifest()
    m["stages"][stage]["status"] = status
    run.write_manifest(m)


def test_example_html_marks_key_token_newlines_and_hover():
    tokens = np.arange(30)
    e = Example(
        rank=0, ctx_id=3, pos=25, act=2.0, window_start=5, window=np.linspace(0, 2, 26, dtype=np.float32), tokens=tokens
    )
    decode = lambda ids: ["\n" if i == 24 else f"<t{i}>" for i in ids]  # noqa: E731
    out = render.example_html(e, decode, scale=2.0, before=3, after=2)
    spans = re.findall(r'<span class="([^"]+)" title="([^"]+)"[^>]*>([^<]*)</span>', out)
    assert [s[2] for s in spans] == [
        "&lt;t22&gt;",
        "&lt;t23&gt;",
        render.NEWLINE,
        "&lt;t25&gt;",
        "&lt;t26&gt;",
        "&lt;t27&gt;",
    ]
    assert [s[0] for s in spans].count("ne-tok ne-key") == 1 and spans[3][0] == "ne-tok ne-key"
    assert [s[1] for s in spans] == [f"activation {e.window[i - 5]:.4g}" for i in range(22, 28)]
    imp = render.example_html(e, decode, 2.0, 3, 2, importance=(23, np.array([0.5, np.nan, -0.25])))
    titles = re.findall(r'title="([^"]+)"', imp)
    assert "importance 0.500" in titles[1] and "importance" not in titles[2] and "importance -0.250" in titles[3]


def test_dendrogram_png():
    from scipy.cluster.hierarchy import fcluster, linkage

    points = np.array([[0.0], [0.1], [5.0], [5.1], [9.0]])
    z = linkage(points, "average")
    labels = fcluster(z, 1.0, "distance") - 1
    png = render.dendrogram_png(z, labels, 1.0)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_launch_command_binds_localhost(lm_run):
    cmd = launch_command(lm_run)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8501" and cmd[-1] == lm_run
    assert launch_command(lm_run, port=0)[cmd.index("--server.port") + 1] == "0"  # for check_address to refuse
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    from ne.cli import build_parser

    args = build_parser().parse_args(["view", lm_run, "--port", "9000"])
    assert args.func.__name__ == "cmd_view" and args.port == 9000 and args.host is None


def test_view_refuses_busy_or_bad_addresses_with_the_reason(lm_run, tmp_path, monkeypatch, capsys):
    import socket

    from ne.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["view", lm_run, "--port", str(port)]) == 2
        assert f"port {port} on 127.0.0.1 is in use (another viewer?); pass --port" in capsys.readouterr().err
    assert main(["view", lm_run, "--port", "70000"]) == 2
    assert "--port 70000 is not a port; choose one in 1..65535" in capsys.readouterr().err
    with monkeypatch.context() as m:  # never silently the default 8501 (a server that would run until killed)
        m.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ne view --port 0 started a server: {a[0]}"))
        assert main(["view", lm_run, "--port", "0"]) == 2
    assert "--port 0 is not a port; choose one in 1..65535" in capsys.readouterr().err
    assert main(["view", lm_run, "--host", "no-such-host.invalid"]) == 2
    assert "--host 'no-such-host.invalid' is not an address this machine knows" in capsys.readouterr().err
    assert main(["view", lm_run, "--host", "203.0.113.7"]) == 2  # TEST-NET-3: no interface has it
    assert "cannot listen on 203.0.113.7" in capsys.readouterr().err
    assert main(["view", str(tmp_path / "absent")]) == 2
    assert "run directory" in capsys.readouterr().err


def test_view_fails_when_its_server_cannot_start(lm_run, monkeypatch, capsys):
    """The port is taken after the check (another program was quicker): Streamlit stops, and so must `ne view`."""
    import ne.viewer
    from ne.cli import main

    monkeypatch.setattr(ne.viewer, "check_address", lambda host, port: None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["view", lm_run, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ne view: error: the viewer's server on 127.0.0.1:{port} stopped with exit code 1 ")


def test_similar_on_a_missing_directory(tmp_path, capsys):
    from ne.cli import main

    assert main(["similar", str(tmp_path / "absent"), "--layer", "0", "--neuron", "0"]) == 2
    assert f"run directory {tmp_path / 'absent'} does not exist" in capsys.readouterr().err


# --- the app, in process (Streamlit's AppTest) ----------------------------------------------------------------


def _app_test(run_dir: str, monkeypatch, **params):
    """The app on `run_dir`, opened at URL query `params` (none: the run overview)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["app.py", run_dir])
    at = AppTest.from_file(str(REPO / "ne" / "viewer" / "app.py"), default_timeout=60)
    for key, value in params.items():
        at.query_params[key] = str(value)
    return at.run()


def _first_neuron(run_dir: str) -> dict:
    return {"layer": 0, "neuron": int(RunData(run_dir).neurons(0)[0])}


def _texts(at) -> str:
    return " ".join(str(el.value) for kind in ("error", "info", "warning") for el in getattr(at, kind))


def test_app_explains_missing_and_half_written_runs(tmp_path, lm_run, monkeypatch):
    at = _app_test(str(tmp_path / "missing"), monkeypatch)
    assert not at.exception and "does not exist" in _texts(at)
    half = tmp_path / "half"
    shutil.copytree(lm_run, half)
    set_status(half, "examples", "running")
    at = _app_test(str(half), monkeypatch)
    assert not at.exception and re.search(r"stage 'examples' of .* is running", _texts(at))


def test_app_explains_neuron_without_examples(lm_run, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["app.py", lm_run])
    at = AppTest.from_file(str(REPO / "ne" / "viewer" / "app.py"), default_timeout=60)
    at.query_params["layer"], at.query_params["neuron"] = str(SILENT[0]), str(SILENT[1])
    at.run()
    assert not at.exception
    assert f"Neuron {SILENT[1]} of layer {SILENT[0]} has no dataset examples" in _texts(at)


def test_app_says_a_negative_neuron_does_not_exist(lm_run, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["app.py", lm_run])
    at = AppTest.from_file(str(REPO / "ne" / "viewer" / "app.py"), default_timeout=60)
    at.query_params["layer"], at.query_params["neuron"] = "0", "-1"
    at.run()
    assert not at.exception
    assert "Neuron -1 does not exist: layer 0 has neurons 0 to 255." in _texts(at)
    assert "no dataset examples" not in _texts(at)


def _break_model(lm_run, tmp_path, **model_fields) -> str:
    """A copy of the run made with model files that are gone now: the config and every stage's settings name
    them (readers take each setting from the stage that ran with it)."""
    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    manifest = RunDir(str(run)).manifest()
    manifest["config"]["model"].update(model_fields)
    for entry in manifest["stages"].values():
        entry["settings"].update(
            {f"model.{k}": v for k, v in model_fields.items() if f"model.{k}" in entry["settings"]}
        )
    RunDir(str(run)).write_json("manifest.json", manifest)
    return str(run)


def test_app_falls_back_to_token_ids_without_the_tokenizer(lm_run, tmp_path, monkeypatch):
    at = _app_test(
        _break_model(lm_run, tmp_path, tokenizer=str(tmp_path / "gone")), monkeypatch, **_first_neuron(lm_run)
    )
    assert not at.exception and not at.error
    assert "tokens are shown as ids" in _texts(at)
    html = " ".join(str(el.proto) for el in at.get("html"))
    assert re.search(r"&gt;\[\d+\]&lt;|>\[\d+\]<", html), "token ids in place of text"


def test_app_decodes_without_the_weights_and_says_importance_needs_them(lm_run, tmp_path, monkeypatch):
    at = _app_test(
        _break_model(lm_run, tmp_path, weights=str(tmp_path / "gone.safetensors")), monkeypatch, **_first_neuron(lm_run)
    )
    assert not at.exception and "tokens are shown as ids" not in _texts(at)
    html = " ".join(str(el.proto) for el in at.get("html"))
    assert not re.search(r"&gt;\[\d+\]&lt;|>\[\d+\]<", html), "decoded text, not ids"
    at.toggle(key="importance").set_value(True).run()
    assert not at.exception
    assert "needs the run's model, which could not be loaded" in _texts(at)


def test_app_names_the_mask_token_the_importance_stage_ran_with(lm_run, tmp_path, tiny_model_cfg, monkeypatch):
    """Issue 17 item 6: `ne importance --set importance.mask_token=100 --force importance` (here its stage, run in
    this process): the viewer says token 100 was the mask, not the pad token of the config the harvest recorded."""
    from jobs.importance import importance_table
    from ne.models import load_model
    from ne.rundir.stages import Stage
    from ne.schema import NeuronBatch

    run_dir = tmp_path / "run"
    shutil.copytree(lm_run, run_dir)
    data, run = RunData(str(run_dir)), RunDir(str(run_dir))
    cfg = data.config()
    cfg.importance.mask_token = 100
    stage = Stage(run, "importance", cfg, force=["importance"])
    stage.begin()
    neuron = int(data.neurons(0)[0])
    batch = NeuronBatch(0, 0, (neuron,))
    run.write_parquet(
        batch.file(schema.IMPORTANCE_DIR),
        importance_table(data, load_model(tiny_model_cfg), batch, 100, cfg.importance.window_before),
    )
    stage.done(neurons={"0": 1})
    assert RunData(str(run_dir)).config().importance.mask_token == 100
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["app.py", str(run_dir)])
    at = AppTest.from_file(str(REPO / "ne" / "viewer" / "app.py"), default_timeout=60)
    at.query_params["layer"], at.query_params["neuron"] = "0", str(neuron)
    at.run()
    assert not at.exception
    assert at.toggle(key="importance").help.endswith("masking one earlier token at a time with token 100")


def test_app_opens_on_the_run_overview(lm_run, monkeypatch):
    """The first page: the run's figures, its most polysemantic units (most substantial clusters among the well
    separated, ranked here by a plain loop) as buttons that open them, a label search, and a way to any unit."""
    from ne.rundir.labels import read_all_labels

    at = _app_test(lm_run, monkeypatch)
    assert not at.exception and not at.error and at.header[0].value == "Run overview"
    m = RunData(lm_run).metrics_table().to_pandas()
    active = m[m.n_examples > 0]
    labels = read_all_labels(RunDir(lm_run), RunData(lm_run).layers())
    rows = []
    for r in active.itertuples():
        mine = labels[(labels.layer == r.layer) & (labels.neuron == r.neuron) & ~labels.outlier]
        big = int((mine["size"] >= max(5, 0.1 * r.n_examples)).sum())
        sil = -1.0 if np.isnan(r.silhouette) else r.silhouette
        rows.append(((-(sil >= 0.25), -big, -sil, r.layer, r.neuron), (r.layer, r.neuron)))
    ranked = [unit for _, unit in sorted(rows)[:12]]
    shown = [b.label for b in at.button if b.key and b.key.startswith("top_")]
    assert [tuple(map(int, re.match(r"Layer (\d+) · (\d+)", s).groups())) for s in shown] == ranked
    metric = {mt.label: mt.value for mt in at.metric}
    assert metric["feature clusters"] == f"{int(active.n_clusters.sum()):,}"
    next(b for b in at.button if b.key and b.key.startswith("top_")).click().run()
    assert at.header[0].value == f"Layer {ranked[0][0]} · Neuron {ranked[0][1]}" and not at.exception

    at.radio(key="page").set_value("Overview").run()
    word = labels[~labels.outlier].sort_values("size").iloc[-1].label.split('"')[1]
    at.text_input(key="label_query").input(word).run()
    hits = [b.label for b in at.button if b.key and b.key.startswith("hit_")]
    expected = [r for r in labels.itertuples() if not r.outlier and word.lower() in r.label.lower()]
    assert hits and len(hits) == min(30, len(expected)) and all(word.lower() in h.lower() for h in hits)
    layer, neuron, cluster = map(int, re.match(r"L(\d+) · N(\d+) · C(\d+)", hits[0]).groups())
    next(b for b in at.button if b.key and b.key.startswith("hit_")).click().run()
    assert at.header[0].value == f"Layer {layer} · Neuron {neuron}" and not at.exception

    at.radio(key="page").set_value("Overview").run()
    at.number_input(key="jump_neuron").set_value(7).run()
    next(b for b in at.button if b.key == "jump_open").click().run()
    assert at.header[0].value == "Layer 0 · Neuron 7" and not at.exception


def test_app_history_back_forward_and_random(lm_run, monkeypatch):
    at = _app_test(lm_run, monkeypatch, **_first_neuron(lm_run))
    first = at.header[0].value
    at.number_input(key="neuron_pick").set_value(200).run()
    assert at.header[0].value == "Layer 0 · Neuron 200"
    button = lambda label: next(b for b in at.button if b.label == label)  # noqa: E731
    button("Random neuron").click().run()
    randomly = at.header[0].value
    layer, neuron = map(int, re.findall(r"\d+", randomly))
    assert neuron in RunData(lm_run).neurons(layer)
    button("◀ Back").click().run()
    assert at.header[0].value == "Layer 0 · Neuron 200"
    button("◀ Back").click().run()
    assert at.header[0].value == first
    button("Forward ▶").click().run()
    button("Forward ▶").click().run()
    assert at.header[0].value == randomly and not at.exception


def test_app_neuron_table_sorts_by_metric(lm_run, monkeypatch):
    at = _app_test(lm_run, monkeypatch)
    at.radio(key="page").set_value("Neuron table").run()
    assert not at.exception and not at.error
    shown = at.dataframe[0].value
    assert len(shown) == min(1000, len(RunData(lm_run).metrics_table()))
    assert shown.n_clusters.is_monotonic_decreasing
    at.selectbox[0].set_value("silhouette").run()
    shown = at.dataframe[0].value
    assert shown.silhouette.dropna().is_monotonic_decreasing and shown.silhouette.notna().any()


# --- a real browser ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settle(page) -> None:
    """Wait until Streamlit has finished rerunning the script (its status widget is gone)."""
    from playwright.sync_api import expect

    page.wait_for_timeout(300)
    expect(page.locator('[data-testid="stStatusWidget"]')).to_have_count(0, timeout=60_000)


EXPLAIN_TEXT = "The for statement is used to iterate over the elements of a sequence, such as a string."


def test_browser_walkthrough(lm_run):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium and chromium-driver to run the browser test")
    from playwright.sync_api import expect, sync_playwright

    data = RunData(lm_run)
    metrics = data.metrics_table().to_pandas()
    layer, neuron = metrics[(metrics.layer == 0) & (metrics.n_clusters >= 2)][["layer", "neuron"]].iloc[0]
    nd = data.neuron(int(layer), int(neuron))
    sizes = {c: len(m) for c, m in nd.clusters().items()}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    port = _free_port()
    log = open(ARTIFACTS / "streamlit.log", "w")
    server = subprocess.Popen(launch_command(lm_run, "127.0.0.1", port), stdout=log, stderr=subprocess.STDOUT)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            deadline = time.time() + 30
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}/")
                    break
                except Exception:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.3)
            # 0. the run overview comes first; its "Open neuron" button opens one
            expect(page.get_by_text("Run overview")).to_be_visible(timeout=60_000)
            top = page.get_by_role("button", name=re.compile(r"^Layer \d+ · \d+: \d+ substantial"))
            expect(top.first).to_be_visible()
            _settle(page)
            page.screenshot(path=ARTIFACTS / "0-overview.png", full_page=True)
            page.get_by_role("button", name="Open neuron", exact=True).click()
            expect(page.get_by_text("Layer 0 · Neuron 0")).to_be_visible(timeout=60_000)
            _settle(page)  # the overview's own widgets are gone once the rerun has finished

            # 1. open a neuron through the picker
            box = page.get_by_test_id("stSidebarUserContent").get_by_role("spinbutton", name="Neuron", exact=True)
            box.fill(str(neuron))
            box.press("Enter")
            expect(page.get_by_text(f"Layer {layer} · Neuron {neuron}")).to_be_visible(timeout=30_000)
            first = page.locator('.ne-cluster[data-cluster="0"] .ne-ex')
            expect(first).to_have_count(sizes[0], timeout=30_000)
            assert page.locator('.ne-cluster[data-cluster="0"] .ne-key').count() == sizes[0]
            assert "activation" in first.first.locator(".ne-key").get_attribute("title")
            expect(page.get_by_role("img").first).to_be_visible()
            _settle(page)
            page.screenshot(path=ARTIFACTS / "1-neuron.png", full_page=True)

            # 2. switch cluster tab: only the selected cluster's examples are rendered
            page.get_by_role("tab", name=re.compile(r"^Cluster 1 ")).click()
            expect(page.locator('.ne-cluster[data-cluster="1"] .ne-ex')).to_have_count(sizes[1], timeout=30_000)
            expect(page.locator('.ne-cluster[data-cluster="0"]')).to_have_count(0)
            _settle(page)
            page.screenshot(path=ARTIFACTS / "2-cluster-tab.png", full_page=True)

            # 3. importance on: every key token's title now carries its importance
            page.get_by_text("Token importance", exact=True).click()
            key = page.locator('.ne-cluster[data-cluster="1"] .ne-tok[title*="importance"]')
            expect(key.first).to_be_visible(timeout=60_000)
            _settle(page)
            page.screenshot(path=ARTIFACTS / "3-importance.png", full_page=True)

            # 4. click a similar feature: its neuron opens on its cluster
            button = page.get_by_role("button", name=re.compile(r"^L\d+ · N\d+ · C\d+")).first
            l2, n2, c2 = map(int, re.findall(r"\d+", button.inner_text())[:3])
            button.click()
            expect(page.get_by_text(f"Layer {l2} · Neuron {n2}")).to_be_visible(timeout=30_000)
            expect(page.locator(f'.ne-cluster[data-cluster="{c2}"] .ne-ex').first).to_be_visible(timeout=30_000)
            _settle(page)
            page.screenshot(path=ARTIFACTS / "4-similar-feature.png", full_page=True)

            # 5. back returns to the neuron we came from
            page.get_by_role("button", name="◀ Back").click()
            expect(page.get_by_text(f"Layer {layer} · Neuron {neuron}")).to_be_visible(timeout=30_000)

            # 6. explain a typed text: coloured tokens, then the firing units per token; one opens its cluster
            page.get_by_text("Explain text", exact=True).click()
            page.get_by_role("textbox", name="Text to explain").fill(EXPLAIN_TEXT)
            page.get_by_role("button", name="Explain").click()
            expect(page.locator(".ne-explained .ne-tok").first).to_be_visible(timeout=90_000)
            unit = page.get_by_role("button", name=re.compile(r"^L\d+ · N\d+ · .* → C\d+")).first
            expect(unit).to_be_visible(timeout=30_000)
            _settle(page)
            page.screenshot(path=ARTIFACTS / "6-explain.png", full_page=True)
            l3, n3, c3 = (int(x) for x in re.match(r"L(\d+) · N(\d+) · .* → C(\d+)", unit.inner_text()).groups())
            unit.click()
            expect(page.get_by_text(f"Layer {l3} · Neuron {n3}")).to_be_visible(timeout=30_000)
            expect(page.locator(f'.ne-cluster[data-cluster="{c3}"] .ne-ex').first).to_be_visible(timeout=30_000)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


# --- MNIST ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    from tests.conftest import require_shared

    models, data = require_shared("mechmnistic"), require_shared("mnist")
    root = tmp_path_factory.mktemp("mnist_run")
    (root / "mnist").mkdir()
    for name in ("mlp", "sae_standard", "sae_ne_loss"):
        shutil.copy(models / f"{name}.safetensors", root / "mnist" / f"{name}.safetensors")
    RunDir(str(root)).set_manifest_entry("mnist_config", {"data": {"dir": str(data)}})
    return str(root)


@pytest.mark.parametrize("kind", ["mlp", "sae_ne_loss"])
def test_mnist_neuron_against_naive_loops(mnist_run, kind):
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    from ne.config import ClusterConfig
    from ne.mnist.data import MnistSplit, load_idx
    from ne.viewer import mnist_page as mp

    mlp, sae = mp.load_models(RunDir(mnist_run), kind)
    test = load_idx(str(mp.mnist_dir(RunDir(mnist_run).manifest())), "test")
    split = MnistSplit(test.images[:2000], test.labels[:2000])
    W1, b1 = mlp.W1.detach().numpy().astype(np.float64), mlp.b1.detach().numpy().astype(np.float64)
    x = (split.images.numpy() / 255.0 - 0.1307) / 0.3081
    hidden = np.maximum(x @ W1.T + b1, 0)
    if sae is None:
        acts_all = hidden
    else:
        W_enc, b_enc, b_dec = (t.detach().numpy().astype(np.float64) for t in (sae.W_enc, sae.b_enc, sae.b_dec))
        acts_all = np.maximum((hidden - b_dec) @ W_enc.T + b_enc, 0)
    neuron = int(np.argmax((acts_all > 0).sum(0)))  # the neuron that fires most often
    view = mp.analyse(mlp, sae, neuron, split, ClusterConfig(cut="fixed", threshold=0.5), max_examples=40)

    a = acts_all[:, neuron]
    np.testing.assert_allclose(view.acts, a, rtol=1e-4, atol=1e-4)
    want = [i for i in range(len(a)) if a[i] > 0][:40]
    assert view.examples.tolist() == want
    e = x[want] * W1[neuron] if sae is None else (hidden[want] - b_dec) * W_enc[neuron]
    labels = fcluster(linkage(pdist(e, "cosine"), "average"), 0.5, "distance")
    got = view.clusters.labels
    assert np.array_equal(labels[:, None] == labels[None, :], got[:, None] == got[None, :])
    W2 = mlp.W2.detach().numpy()
    effect = W2[:, neuron] if sae is None else W2 @ sae.W_dec.detach().numpy()[:, neuron]
    np.testing.assert_allclose(view.logit_effect, effect, rtol=1e-5, atol=1e-6)

    def pre(img):  # one image's pre-activation, uint8 pixels
        xi = (img / 255.0 - 0.1307) / 0.3081
        hi = np.maximum(xi @ W1.T + b1, 0)
        return xi @ W1[neuron] + b1[neuron] if sae is None else (hi - b_dec) @ W_enc[neuron] + b_enc[neuron]

    black = pre(np.zeros(784))
    act_map = np.zeros(784)
    for p in range(784):
        img = np.zeros(784)
        img[p] = 255
        act_map[p] = max(pre(img) - black, 0.0)
    np.testing.assert_allclose(view.activation_map.ravel(), act_map, rtol=1e-4, atol=1e-5)
    mean = split.images[want].numpy().mean(0) / 255.0
    np.testing.assert_allclose(view.importance_map.ravel(), mean * act_map / act_map.max(), rtol=1e-4, atol=1e-5)


def test_mnist_page_renders(mnist_run, monkeypatch):
    at = _app_test(mnist_run, monkeypatch)
    assert not at.exception and not at.error
    assert any("MNIST" in h.value for h in at.header)
    at.selectbox(key="mnist_model").set_value("SAE (+ NE loss)").run()
    assert not at.exception and not at.error
    assert any("SAE (+ NE loss) · neuron 0" in s.value for s in at.subheader)
