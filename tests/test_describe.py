"""LLM descriptions against a chat-completions server started in the test: prompts, concurrency, retries, the cache,
resume after a failure and after a kill, token cost, every bad answer as a one-line error, and detection scoring."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ne import schema
from ne.cli import main
from ne.config import DescribeConfig, RunConfig, from_dict, to_dict
from ne.describe import ChatClient, clusters_to_describe, detection_score, read_descriptions, run_describe
from ne.errors import DataError
from ne.rundir.stages import state_of
from ne.rundir.store import RunDir
from tests.conftest import REPO

KEY = "sk-test-3f9a7c"


class ChatServer:
    """Speaks chat completions on 127.0.0.1. `answer(body, n)` → (status, headers, payload) for the n-th request
    (0-based); by default a description naming the neuron the prompt is about, with token usage."""

    def __init__(self, answer=None, delay: float = 0.0):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.answer = answer or self.describe
        self.delay = delay
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                time.sleep(server.delay)
                status, headers, payload = server.answer(body, n)
                with server.lock:
                    server.in_flight -= 1
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def reply(text: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> tuple[int, dict, dict]:
        return (
            200,
            {},
            {
                "id": "x",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            },
        )

    @classmethod
    def describe(cls, body: dict, n: int):
        prompt = body["messages"][-1]["content"]
        neuron, layer = re.search(r"Neuron (\d+) of layer (\d+)", prompt).groups()
        return cls.reply(f'"Tokens of neuron {neuron} in layer {layer}."\nmore text', len(prompt) // 4, 7)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


def _copy(lm_run: str, tmp_path: Path, url: str, **describe) -> RunConfig:
    shutil.copytree(lm_run, tmp_path / "run")
    cfg = from_dict(RunConfig, RunDir(lm_run).manifest()["config"])
    cfg.run_dir = str(tmp_path / "run")
    cfg.describe = DescribeConfig(base_url=url, model="test-model", backoff_s=0.0, **describe)
    return cfg


def _table(cfg: RunConfig) -> pd.DataFrame:
    parts = RunDir(cfg.run_dir).ls(schema.DESCRIPTIONS_DIR, suffix=".parquet")
    return pd.concat([RunDir(cfg.run_dir).read_parquet(f"{schema.DESCRIPTIONS_DIR}/{p}").to_pandas() for p in parts])


def test_descriptions_are_asked_concurrently_cached_and_extended(lm_run, tmp_path, monkeypatch):
    server = ChatServer(delay=0.05)
    monkeypatch.setenv("NE_TEST_KEY", KEY)
    cfg = _copy(lm_run, tmp_path, server.url, api_key_env="NE_TEST_KEY", max_concurrency=3, flush_every=5)
    try:
        summary = run_describe(cfg, limit=12)
        todo = clusters_to_describe(RunDir(cfg.run_dir), None, None, 12, cfg.cluster.min_cluster_size)
        table = _table(cfg)
        assert sorted(zip(table.layer, table.neuron, table.cluster)) == sorted(todo) and len(table) == 12
        assert (
            table.description
            == [f"Tokens of neuron {n} in layer {layer}" for n, layer in zip(table.neuron, table.layer)]
        ).all()  # first line, quotes and stop removed
        assert summary.described == 12 and summary.cached == 0 and 1 < server.max_in_flight <= 3
        assert summary.prompt_tokens == sum(len(r["messages"][-1]["content"]) // 4 for r in server.requests)
        assert summary.completion_tokens == 7 * 12 and "tokens used" in summary.describe()
        assert all(h["Authorization"] == f"Bearer {KEY}" for h in server.headers)
        body = server.requests[0]
        assert body["model"] == "test-model" and body["temperature"] == 0.0 and body["messages"][0]["role"] == "system"
        prompts = [r["messages"][-1]["content"] for r in server.requests]
        assert all("[[" in p and "]]" in p for p in prompts)
        assert any("Behaviour A:" in p and "do not describe these" in p for p in prompts)
        for path in Path(cfg.run_dir).rglob("*"):  # the key never lands in the run
            assert not path.is_file() or KEY.encode() not in path.read_bytes()
        again = run_describe(cfg, limit=12)
        assert again.described == 0 and again.cached == 12 and len(server.requests) == 12
        more = run_describe(cfg, limit=20)
        assert more.described == 8 and more.cached == 12 and len(server.requests) == 20
        assert len(_table(cfg)) == 20 and state_of(RunDir(cfg.run_dir).manifest(), "describe")[0] == "done"
    finally:
        server.close()


def test_a_failed_run_keeps_what_it_made_and_the_next_one_does_the_rest(lm_run, tmp_path, capsys):
    healthy = ChatServer.describe

    def dies_after_7(body, n):
        return healthy(body, n) if n < 7 else (500, {}, {"error": "boom"})

    server = ChatServer(dies_after_7)
    cfg = _copy(lm_run, tmp_path, server.url, max_concurrency=1, flush_every=3, max_retries=1)
    try:
        with pytest.raises(
            DataError,
            match=r"answered HTTP 500 .* 2 times.*7 descriptions made before the "
            r"failure are kept",
        ):
            run_describe(cfg, limit=15)
        assert len(_table(cfg)) == 7 and state_of(RunDir(cfg.run_dir).manifest(), "describe")[0] == "running"
        server.answer = healthy
        asked = len(server.requests)
        summary = run_describe(cfg, limit=15)
        assert summary.described == 8 and len(server.requests) - asked == 8
        table = _table(cfg)
        assert len(table) == 15 and not table.duplicated(["layer", "neuron", "cluster"]).any()
    finally:
        server.close()


def test_a_killed_run_resumes_without_losing_or_repeating(lm_run, tmp_path):
    server = ChatServer(delay=0.15)
    cfg = _copy(lm_run, tmp_path, server.url, max_concurrency=1, flush_every=2)
    config = tmp_path / "describe.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ne.cli", "describe", "--config", str(config), "--limit", "14"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        folder = Path(cfg.run_dir) / schema.DESCRIPTIONS_DIR
        deadline = time.time() + 120
        while len(list(folder.glob("part-*.parquet"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kept = len(_table(cfg))
        assert 4 <= kept < 14, proc.stderr.read().decode()[-2000:]
        asked = len(server.requests)
        summary = run_describe(cfg, limit=14)
        assert summary.described == 14 - kept and summary.cached == kept
        assert len(server.requests) - asked == 14 - kept
        table = _table(cfg)
        assert len(table) == 14 and not table.duplicated(["layer", "neuron", "cluster"]).any()
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD = {
    "unreachable": (None, r"could not be reached \(.*\) in 3 tries; check that it is up"),
    "429": (lambda body, n: (429, {"Retry-After": "0"}, {"error": "slow down"}), r"answered HTTP 429 .* 3 times"),
    "500": (lambda body, n: (500, {}, b"internal error"), r"answered HTTP 500 \('internal error'\) 3 times"),
    "not json": (lambda body, n: (200, {}, b"hello"), r"reply that is not a chat completion .*'hello'"),
    "no choices": (lambda body, n: (200, {}, {"object": "chat.completion"}), r"not a chat completion \(KeyError"),
    "401": (lambda body, n: (401, {}, {"error": "bad key"}), r"answered HTTP 401 .*bad key.*check describe.model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_endpoints_are_one_line_errors(case, lm_run, tmp_path, capsys):
    answer, message = BAD[case]
    server = None if answer is None else ChatServer(answer)
    url = f"http://127.0.0.1:{_closed_port()}/v1" if server is None else server.url
    cfg = _copy(lm_run, tmp_path, url, max_retries=2, max_concurrency=1)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    try:
        assert main(["describe", "--config", str(config), "--limit", "3"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err), err
        assert not read_descriptions(RunDir(cfg.run_dir))
        if server is not None:
            assert len(server.requests) == (1 if case in ("not json", "no choices", "401") else 3)
    finally:
        if server is not None:
            server.close()


def test_a_missing_key_variable_or_model_is_named(lm_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NE_ABSENT_KEY", raising=False)
    cfg = _copy(lm_run, tmp_path, "http://127.0.0.1:9/v1", api_key_env="NE_ABSENT_KEY")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["describe", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "describe.api_key_env names $NE_ABSENT_KEY, which is not set" in err
    assert (
        main(
            ["describe", "--config", str(config), "--set", "describe.api_key_env=null", "--set", "describe.model=null"]
        )
        == 2
    )
    assert "describe.model is not set" in capsys.readouterr().err
    assert main(["describe", "--config", str(config), "--set", "describe.api_key_env=sk-abc.def"]) == 2
    assert "give the NAME of an environment variable" in capsys.readouterr().err


def test_retries_wait_and_then_succeed(lm_run, tmp_path):
    healthy = ChatServer.describe
    server = ChatServer(lambda body, n: (429, {"Retry-After": "0"}, {}) if n < 2 else healthy(body, n))
    cfg = _copy(lm_run, tmp_path, server.url, max_retries=2, max_concurrency=1)
    try:
        assert run_describe(cfg, limit=1).described == 1 and len(server.requests) == 3
    finally:
        server.close()


def test_detection_score_is_the_balanced_accuracy_of_the_answers():
    def says_for(body, n):  # a judge that answers 1 for texts that hold the word "for"
        texts = re.findall(r"^Text \d+: (.*)$", body["messages"][-1]["content"], re.M)
        return ChatServer.reply(json.dumps([int(" for " in f" {t} ") for t in texts]))

    server = ChatServer(says_for)
    try:
        client = ChatClient(DescribeConfig(base_url=server.url, model="m"))
        positives = ["a for loop", "for each item", "waits for it", "the while loop"]
        negatives = ["the while loop", "if x", "return for", "x = 1", "def f"]
        score = detection_score(client, '"for"', positives, negatives, batch_size=4, seed=3)
        tpr, tnr = 3 / 4, 4 / 5  # naive: positives holding " for ", negatives without it
        assert (score.true_positive_rate, score.true_negative_rate) == (tpr, tnr)
        assert score.balanced_accuracy == pytest.approx((tpr + tnr) / 2)
        assert [len(re.findall(r"^Text \d+:", r["messages"][-1]["content"], re.M)) for r in server.requests] == [
            4,
            4,
            1,
        ]
        assert '"for"' in server.requests[0]["messages"][-1]["content"]
        server.answer = lambda body, n: ChatServer.reply("yes, the first and third")
        with pytest.raises(DataError, match=r"did not answer with a list of 4 zeros and ones: 'yes, the first"):
            detection_score(client, '"for"', positives, negatives, batch_size=4)
    finally:
        server.close()
