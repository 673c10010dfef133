"""LLM descriptions of feature clusters, through any OpenAI-compatible chat-completions endpoint, and their scores.

`describe_clusters` asks for one short description per cluster: the prompt shows the cluster's examples (the token
where the neuron fires marked [[like this]]) against examples of the neuron's other clusters. Requests run
`describe.max_concurrency` at a time; HTTP 429, 5xx, timeouts and lost connections are retried with a doubling wait.
Every `describe.flush_every` finished descriptions are written as one Parquet part (atomically), so a killed or
failed run keeps what it finished and the next run describes only the rest. The key is read from the environment
variable `describe.api_key_env` names when requests are sent, and is never written anywhere.

`detection_score` is delphi's detection scoring: given only a description, the LLM says which of a shuffled set of
texts the feature fires in; the score is the balanced accuracy.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ne import schema
from ne.config import DescribeConfig, RunConfig
from ne.errors import ConfigError, DataError
from ne.rundir.graph import stages_of
from ne.rundir.reader import NeuronData, RunData, key_token_snippet
from ne.rundir.stages import Stage, check_force
from ne.rundir.store import RunDir

log = logging.getLogger(__name__)

RETRIED_STATUS = (408, 409, 429, 500, 502, 503, 504)
MAX_WAIT_S = 60.0
"""The longest wait before a retry, whatever the server's Retry-After says."""
MAX_DESCRIPTION = 200
SYSTEM = (
    "You are an interpretability researcher. You describe, in one short phrase, what makes a neuron of a "
    "language model fire."
)


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int


def api_key(cfg: DescribeConfig) -> str | None:
    """The key from the environment variable the config names; None when it names none."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ConfigError(
            f"describe.api_key_env names ${cfg.api_key_env}, which is not set; export {cfg.api_key_env}"
            "=YOUR_KEY, or set describe.api_key_env: null for a server that needs no key"
        )
    return key


class ChatClient:
    """Chat completions from one endpoint, with retries. Thread-safe: one client serves every worker thread."""

    def __init__(self, cfg: DescribeConfig, seed: int = 0):
        if not cfg.model:
            raise ConfigError(
                "describe.model is not set; name the chat model the endpoint serves, e.g. "
                "--set describe.model=meta-llama/Llama-3.1-8B-Instruct"
            )
        self.cfg, self.key = cfg, api_key(cfg)
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def complete(self, messages: list[dict], max_tokens: int | None = None) -> Reply:
        body = json.dumps(
            {
                "model": self.cfg.model,
                "messages": messages,
                "temperature": self.cfg.temperature,
                "max_tokens": max_tokens or self.cfg.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        tries = self.cfg.max_retries + 1
        for attempt in range(tries):
            retry_after = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                    return parse_reply(response.read(), self.url)
            except urllib.error.HTTPError as exc:
                detail = _head(exc.read())
                if exc.code not in RETRIED_STATUS:
                    raise DataError(
                        f"the chat endpoint {self.url} answered HTTP {exc.code} ({detail}); check "
                        f"describe.model, describe.base_url and the key"
                    ) from None
                failure = f"answered HTTP {exc.code} ({detail}) {tries} times"
                retry_after = _seconds(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
                reason = getattr(exc, "reason", exc)
                failure = f"could not be reached ({reason}) in {tries} tries"
            if attempt + 1 < tries:
                time.sleep(self._wait(attempt, retry_after))
        raise DataError(
            f"the chat endpoint {self.url} {failure}; check that it is up and describe.base_url, or "
            "retry later with fewer requests at once (describe.max_concurrency)"
        )

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_WAIT_S)
        with self._lock:
            jitter = 1.0 + 0.25 * self._random.random()
        return min(self.cfg.backoff_s * 2**attempt * jitter, MAX_WAIT_S)


def parse_reply(raw: bytes, url: str) -> Reply:
    """The text and token counts of a chat-completions reply; a reply of another shape is an error."""
    try:
        data = json.loads(raw)
        text = data["choices"][0]["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("content is not text")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise DataError(
            f"the chat endpoint {url} sent a reply that is not a chat completion ({type(exc).__name__}: "
            f"{exc}): {_head(raw)}"
        ) from None
    usage = data.get("usage") or {}
    return Reply(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def _head(raw: bytes, n: int = 120) -> str:
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    return repr(text[:n] + ("…" if len(text) > n else ""))


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# --- prompts ---------------------------------------------------------------------------------------------------


def snippet(example, decode, cfg: DescribeConfig) -> str:
    return key_token_snippet(example.tokens, example.pos, decode, cfg.window_before, cfg.window_after)


def describe_prompt(nd: NeuronData, cluster: int, decode: Callable, cfg: DescribeConfig) -> list[dict]:
    """The chat messages asking for a description of one cluster of a neuron, against its other clusters."""
    clusters = nd.clusters()
    own = clusters[cluster][: cfg.examples]
    others = sorted(
        ((c, m) for c, m in clusters.items() if c not in (cluster, -1) and not m[0].outlier),
        key=lambda item: (-len(item[1]), item[0]),
    )[: cfg.contrast_clusters]
    lines = [
        f"Neuron {nd.neuron} of layer {nd.layer} fires on several distinct behaviours. Below are examples of ONE "
        "of them; in each, the token where the neuron fires is marked [[like this]].",
        "",
        "Examples of this behaviour:",
    ]
    lines += [f"{i}. {snippet(e, decode, cfg)}" for i, e in enumerate(own, 1)]
    if others and cfg.contrast_examples:
        lines += ["", "The same neuron's other behaviours, for contrast (do not describe these):"]
        for j, (_, members) in enumerate(others):
            lines.append(f"Behaviour {chr(ord('A') + j)}:")
            lines += [f"- {snippet(e, decode, cfg)}" for e in members[: cfg.contrast_examples]]
    lines += [
        "",
        "In at most 12 words, say what sets this behaviour apart: what the marked token is and the context "
        "it appears in. Answer with the phrase only.",
    ]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def prompt_sha(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def clean(text: str) -> str:
    """The first line of a reply, without quotes or a trailing full stop, cut to `MAX_DESCRIPTION` characters."""
    line = next((x.strip() for x in text.strip().splitlines() if x.strip()), "")
    line = line.strip("\"'“”` ").removesuffix(".")
    return line[:MAX_DESCRIPTION]


# --- the cache: descriptions/part-NNNNN.parquet -----------------------------------------------------------------


def read_descriptions(run: RunDir) -> dict[tuple[int, int, int], dict]:
    """{(layer, neuron, cluster): row} of every stored description (the first one where a cluster has two)."""
    out: dict[tuple[int, int, int], dict] = {}
    for name in run.ls(schema.DESCRIPTIONS_DIR, suffix=".parquet"):
        for row in run.read_parquet(f"{schema.DESCRIPTIONS_DIR}/{name}").to_pylist():
            out.setdefault((row["layer"], row["neuron"], row["cluster"]), row)
    return out


class PartWriter:
    """Finished rows (descriptions, or detection scores), written `every` at a time as new numbered parts of
    `folder`; thread-safe."""

    def __init__(
        self,
        run: RunDir,
        every: int,
        folder: str = schema.DESCRIPTIONS_DIR,
        rows_schema: pa.Schema = schema.DESCRIPTIONS,
    ):
        self.run, self.every, self.folder, self.schema = run, every, folder, rows_schema
        self.rows: list[dict] = []
        self.lock = threading.Lock()
        parts = run.ls(folder, suffix=".parquet")
        self.next = max((int(name[5:10]) for name in parts), default=-1) + 1
        self.written = 0

    def add(self, row: dict) -> None:
        with self.lock:
            self.rows.append(row)
            if len(self.rows) >= self.every:
                self._flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        self.run.write_parquet(schema.part_path(self.folder, self.next), table)
        self.next += 1
        self.written += len(self.rows)
        self.rows = []


@dataclass
class DescribeSummary:
    described: int
    """Clusters described by this call."""
    cached: int
    """Clusters asked for that already had a description."""
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    def describe(self) -> str:
        return (
            f"describe done in {self.seconds:.1f} s: {self.described} clusters described now, {self.cached} "
            f"already cached; tokens used: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion "
            f"= {self.prompt_tokens + self.completion_tokens:,}"
        )


def run_until_failure(fn: Callable[[Any], None], items: Sequence, threads: int) -> BaseException | None:
    """`fn` of every item, `threads` at a time, until one fails: no call starts after that, the calls in flight
    finish, and the first failure is returned (None when all succeed)."""
    stop = threading.Event()

    def one(item) -> None:
        if stop.is_set():
            return
        try:
            fn(item)
        except BaseException:
            stop.set()
            raise

    failure: BaseException | None = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(one, item) for item in items]
        for future in concurrent.futures.as_completed(futures):
            if future.cancelled():
                continue
            exc = future.exception()
            if exc is not None and failure is None:
                failure = exc
                for f in futures:
                    f.cancel()
    return failure


def describe_clusters(
    run: RunDir,
    data: RunData,
    todo: Sequence[tuple[int, int, int]],
    decode: Callable,
    client: ChatClient,
    cfg: DescribeConfig,
) -> DescribeSummary:
    """Describe each (layer, neuron, cluster) of `todo` that has no description yet, `cfg.max_concurrency` at a time.

    On the first failure no new request is started; the requests in flight finish, everything finished is written,
    and the error is raised."""
    start = time.perf_counter()
    have = read_descriptions(run)
    wanted = [t for t in todo if t not in have]
    writer = PartWriter(run, cfg.flush_every)
    tokens = [0, 0]
    count_lock = threading.Lock()
    neurons: dict[tuple[int, int], NeuronData] = {}

    def describe_one(item: tuple[int, int, int]) -> None:
        layer, neuron, cluster = item
        with count_lock:
            nd = neurons.get((layer, neuron))
        if nd is None:
            nd = data.neuron(layer, neuron)
            with count_lock:
                neurons[(layer, neuron)] = nd
        messages = describe_prompt(nd, cluster, decode, cfg)
        reply = client.complete(messages)
        writer.add(
            {
                "layer": layer,
                "neuron": neuron,
                "cluster": cluster,
                "description": clean(reply.text),
                "model": cfg.model,
                "prompt_sha": prompt_sha(messages),
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
            }
        )
        with count_lock:
            tokens[0] += reply.prompt_tokens
            tokens[1] += reply.completion_tokens

    failure = run_until_failure(describe_one, wanted, cfg.max_concurrency)
    writer.flush()
    if failure is not None:
        kept = len(have) + writer.written
        if isinstance(failure, (DataError, ConfigError)):
            raise type(failure)(
                f"{failure} ({writer.written} descriptions made before the failure are kept, "
                f"{kept} in all; rerun to describe the rest)"
            ) from None
        raise failure
    return DescribeSummary(writer.written, len(todo) - len(wanted), tokens[0], tokens[1], time.perf_counter() - start)


def clusters_to_describe(
    run: RunDir, layers: Sequence[int] | None, neurons: Sequence[int] | None, limit: int | None, min_cluster_size: int
) -> list[tuple[int, int, int]]:
    """(layer, neuron, cluster) of every cluster of `layers` and `neurons` (default all) that is not an outlier, in
    that order, the first `limit` of them."""
    m = run.manifest()
    have = m["stages"]["examples"]["info"]["layers"]
    bad = sorted(set(layers or ()) - set(have))
    if bad:
        raise ConfigError(f"--layer {bad[0]} is not in {run.url}; it has layers {have}")
    d_mlp = m.get("model", {}).get("d_mlp")
    wrong = [n for n in neurons or () if n < 0 or (d_mlp is not None and n >= d_mlp)]
    if wrong:
        raise ConfigError(f"--neuron {wrong[0]} is out of range; the layers of {run.url} have neurons 0..{d_mlp - 1}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit is {limit}; describe at least one cluster, e.g. --limit 100")
    out: list[tuple[int, int, int]] = []
    for layer in sorted(layers or have):
        filters = [("neuron", "in", [int(n) for n in neurons])] if neurons else None
        table = run.read_parquet(
            schema.layer_dir(schema.CENTROIDS_DIR, layer), columns=["neuron", "cluster", "size"], filters=filters
        ).sort_by([("neuron", "ascending"), ("cluster", "ascending")])
        rows = zip(*(table.column(c).to_pylist() for c in ("neuron", "cluster", "size")))
        out += [(layer, n, c) for n, c, size in rows if size >= min_cluster_size]
    return out[:limit] if limit is not None else out


def run_describe(
    cfg: RunConfig,
    layers: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    limit: int | None = None,
    force: Sequence[str] = (),
) -> DescribeSummary:
    """Describe the run's feature clusters (those of `layers` and `neurons`, the first `limit`) that have no
    description yet; the `describe` stage adds to what is there, as `ne importance` does."""
    from ne.models import load_token_decoder

    forced = check_force(force, stages_of("ne describe"))
    run = RunDir(cfg.run_dir)
    with run.lock("ne describe"):
        stage = Stage(run, "describe", cfg, forced)
        needed = stage.needed()
        client = ChatClient(cfg.describe, cfg.seed)  # a missing model or key is an error before anything changes
        todo = clusters_to_describe(run, layers, neurons, limit, cfg.cluster.min_cluster_size)
        have = {} if needed else read_descriptions(run)
        if needed:
            stage.begin()
        elif any(t not in have for t in todo):
            stage.begin(extend=True)
        else:
            return DescribeSummary(0, len(todo), 0, 0, 0.0)
        summary = describe_clusters(run, RunData(run.url), todo, load_token_decoder(cfg.model), client, cfg.describe)
        stage.done(descriptions=len(read_descriptions(run)))
        return summary


# --- detection scoring --------------------------------------------------------------------------------------------


def detection_prompt(description: str, texts: Sequence[str]) -> list[dict]:
    lines = [
        f'A neuron\'s feature is described as: "{description}".',
        "",
        f"Below are {len(texts)} texts. The feature fires in some of them, on one token, and not at all in the "
        "others. For each text, answer 1 if you think the feature fires in it and 0 if not.",
        "",
    ]
    lines += [f"Text {i}: {t}" for i, t in enumerate(texts, 1)]
    lines += ["", f"Reply with a JSON list of {len(texts)} numbers, 0 or 1, one per text in order, and nothing else."]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def parse_detection(text: str, n: int, url: str) -> list[int]:
    match = re.search(r"\[[^\[\]]*\]", text)
    try:
        values = json.loads(match.group(0)) if match else None
    except ValueError:
        values = None
    if not isinstance(values, list) or len(values) != n or any(v not in (0, 1) for v in values):
        raise DataError(
            f"the chat endpoint {url} did not answer with a list of {n} zeros and ones: {_head(text.encode())}"
        )
    return [int(v) for v in values]


@dataclass
class DetectionScore:
    balanced_accuracy: float
    true_positive_rate: float
    true_negative_rate: float
    n_positive: int
    n_negative: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


def detection_score(
    client: ChatClient,
    description: str,
    positives: Sequence[str],
    negatives: Sequence[str],
    batch_size: int = 10,
    seed: int = 0,
) -> DetectionScore:
    """Balanced accuracy of the LLM telling `positives` (texts where the feature fires) from `negatives` (texts where
    it does not) given only `description`: texts shuffled with `seed`, `batch_size` per request."""
    if not positives or not negatives:
        raise ConfigError(
            f"detection scoring needs texts where the feature fires and texts where it does not; got "
            f"{len(positives)} and {len(negatives)}"
        )
    items = [(t, 1) for t in positives] + [(t, 0) for t in negatives]
    random.Random(seed).shuffle(items)
    guesses: list[int] = []
    tokens = [0, 0]
    for lo in range(0, len(items), batch_size):
        texts = [t for t, _ in items[lo : lo + batch_size]]
        reply = client.complete(detection_prompt(description, texts), max_tokens=8 * len(texts) + 16)
        guesses += parse_detection(reply.text, len(texts), client.url)
        tokens = [tokens[0] + reply.prompt_tokens, tokens[1] + reply.completion_tokens]
    truth = [y for _, y in items]
    tp = sum(g == y == 1 for g, y in zip(guesses, truth))
    tn = sum(g == y == 0 for g, y in zip(guesses, truth))
    tpr, tnr = tp / len(positives), tn / len(negatives)
    return DetectionScore((tpr + tnr) / 2, tpr, tnr, len(positives), len(negatives), *tokens)
