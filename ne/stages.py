"""The stage graph: every stage of a run, what it reads, and the one lifecycle every stage follows.

```
contexts                            the corpus, tokenised
sae        <- contexts              an SAE trained on the corpus (a no-op unless sae.train_hook is set)
weights    <- sae                   W_in and b_in of every harvested layer
maxima     <- contexts, sae         pass 1: each unit's maximum
examples   <- contexts, maxima      pass 2: each unit's dataset examples and their h
cluster    <- examples, weights     feature clusters, centroids, metrics, the report
index      <- cluster               FAISS index of the clusters' central examples
occurrence <- cluster               held-out text, and every feature cluster's occurrences in it
coactivation <- occurrence          per-feature statistics and which features fire together
importance <- examples              token importance (adds neurons run by run)
mnist_mlp <- ; mnist_sae_standard, mnist_sae_ne_loss <- mnist_mlp ; mnist_eval <- both SAEs
```

A stage records in the manifest the settings its outputs depend on, its upstream stages' fingerprints and
a record (size, hash) of every file it wrote. From these:
- a rerun skips a finished stage, after checking that its files are intact;
- a setting changed anywhere upstream is an error naming the key, both values and the fix;
- redoing a stage (forced, or because its upstream changed) first marks every stage downstream of it stale
  and removes their outputs, so nothing built on the old results is ever served or mixed with new ones;
- a stage reads its inputs only after checking the upstream files against their records.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import textwrap
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from ne.errors import ConfigError, DataError
from ne.store import RunDir, fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageDef:
    name: str
    command: str
    """The `ne` command that runs the stage."""
    upstream: tuple[str, ...] = ()
    settings: tuple = ()
    """Config keys the outputs depend on (`section.*`: every key of the section; `-prefix` drops the keys
    that start with it; a function of the config gives keys that count only for some configs)."""
    outputs: tuple[str, ...] = ()
    """Run-relative files and folders the stage owns (`_work/...`: half-done work, never recorded)."""
    layout: tuple[str, ...] = ()
    """Keys that shape half-done work but not the result: an interrupted stage resumes only with the same."""


MODEL_KEYS = ("model.backend", "model.name", "model.weights", "model.architecture", "model.tokenizer",
              "model.dtype")
GRAPH: dict[str, StageDef] = {d.name: d for d in (
    StageDef("contexts", "ne harvest", (), ("data.*", "model.backend", "model.name", "model.tokenizer"),
             ("contexts",)),
    StageDef("sae", "ne harvest", ("contexts",), ("sae.path", "sae.train_hook", lambda cfg: _sae_training(cfg)),
             ("sae",)),
    StageDef("weights", "ne harvest", ("sae",), (*MODEL_KEYS, "harvest.layers"), ("weights",)),
    StageDef("maxima", "ne harvest", ("contexts", "sae"),
             (*MODEL_KEYS, "harvest.layers", "harvest.maxima_file", "harvest.direction"),
             ("maxima.parquet", "_work/maxima")),
    StageDef("examples", "ne harvest", ("contexts", "maxima"),
             ("harvest.k", "harvest.frac", "harvest.window_before", "harvest.window_after", "harvest.h_dtype",
              "harvest.direction"),
             ("examples", "h", "_work/examples", "_work/h", "_work/kept")),
    StageDef("cluster", "ne cluster", ("examples", "weights"),
             ("cluster.method", "cluster.cut", "cluster.threshold", "cluster.min_separation", "cluster.min_silhouette",
              "cluster.silhouette_tolerance", "cluster.max_clusters", "cluster.min_cluster_size",
              "model.gated_embedding"),
             ("clusters", "dendrograms", "centroids", "metrics.parquet", "report", "_work/cluster"),
             layout=("cluster.neurons_per_task",)),
    StageDef("index", "ne index", ("cluster",), ("index.*", "-index.device", "seed", "model.gated_embedding"),
             ("index",)),
    StageDef("occurrence", "ne occurrence", ("cluster",),
             ("occurrence.contexts", lambda cfg: _heldout_corpus(cfg), "occurrence.frac"),
             ("heldout", "occurrences", "_work/occurrence"), layout=("occurrence.contexts_per_part",)),
    StageDef("coactivation", "ne occurrence", ("occurrence",), ("coactivation.*", "-coactivation.memory_mb"),
             ("features", "coactivation", "_work/coactivation")),
    StageDef("importance", "ne importance", ("examples",), ("importance.mask_token", "importance.window_before"),
             ("importance",)),
    StageDef("mnist_mlp", "ne train", (), ("seed", "data.source", "data.train_subset", "mlp.*"),
             ("mnist/mlp.safetensors",)),
    StageDef("mnist_sae_standard", "ne train", ("mnist_mlp",), ("sae.*", "-sae.ne_"),
             ("mnist/sae_standard.safetensors",)),
    StageDef("mnist_sae_ne_loss", "ne train", ("mnist_mlp",), ("sae.*",), ("mnist/sae_ne_loss.safetensors",)),
    StageDef("mnist_eval", "ne train", ("mnist_sae_standard", "mnist_sae_ne_loss"), ("eval.*", "data.test_subset"),
             ("mnist/sae_eval.md", "mnist/sae_eval.csv")),
)}
HARVEST = ("contexts", "sae", "weights", "maxima", "examples")
LM_STAGES = (*HARVEST, "cluster", "index", "occurrence", "coactivation", "importance")
MNIST_STAGES = ("mnist_mlp", "mnist_sae_standard", "mnist_sae_ne_loss", "mnist_eval")


def ancestors(name: str) -> list[str]:
    """Every stage `name` depends on, directly or not, upstream first."""
    out: list[str] = []

    def visit(stage: str) -> None:
        for up in GRAPH[stage].upstream:
            if up not in out:
                visit(up)
                out.append(up)

    visit(name)
    return out


def descendants(name: str) -> list[str]:
    """Every stage that depends on `name`, directly or not, in graph order."""
    return [d for d in GRAPH if name in ancestors(d)]


def owner_of(rel: str) -> str | None:
    """The stage that writes run-relative path `rel`."""
    best = None
    for spec in GRAPH.values():
        for out in spec.outputs:
            if (rel == out or rel.startswith(out.rstrip("/") + "/")) and (best is None or len(out) > len(best[1])):
                best = (spec.name, out)
    return best[0] if best else None


def redo_command(stage: str, force: bool = True) -> str:
    return f"`{GRAPH[stage].command} --config CONFIG" + (f" --force {stage}`" if force else "`")


def check_force(force: Collection[str], stages: Sequence[str]) -> set[str]:
    """The forced stage names, each one a stage that this command runs; anything else is an error."""
    for name in force:
        if name not in GRAPH:
            raise ConfigError(f"--force {name!r} names no stage; this command's stages are: {', '.join(stages)}")
        if name not in stages:
            raise ConfigError(f"--force {name}: stage '{name}' is run by `{GRAPH[name].command}`; this command "
                              f"runs {', '.join(stages)}")
    return set(force)


def _sae_training(cfg: Any) -> tuple[str, ...]:
    """How the run's own SAE is trained matters only when the run trains one."""
    return ("sae.train_tokens", "sae.train.*") if cfg.sae.train_hook else ()


def _heldout_corpus(cfg: Any) -> tuple[str, ...]:
    """A named held-out corpus counts by its keys; the run's own corpus is `occurrence.corpus: null`."""
    return ("occurrence.corpus.*",) if cfg.occurrence.corpus is not None else ("occurrence.corpus",)


def settings_of(cfg: Any, keys: Sequence) -> dict[str, Any]:
    """{dotted key: value} of the config for `keys`, as JSON values (as the manifest keeps them)."""
    out: dict[str, Any] = {}
    for key in [k for entry in keys for k in (entry(cfg) if callable(entry) else (entry,))]:
        if key.startswith("-"):
            out = {k: v for k, v in out.items() if not k.startswith(key[1:])}
            continue
        section, _, name = key.rpartition(".")
        obj = cfg
        for part in section.split(".") if section else ():
            obj = getattr(obj, part)
        if name == "*":
            out.update({f"{section}.{f.name}": getattr(obj, f.name) for f in dataclasses.fields(obj)})
        else:
            out[key] = getattr(obj, name)
    return json.loads(json.dumps(out, default=str))


def changed(recorded: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, current value) for every key whose value differs."""
    return [(k, recorded.get(k), now.get(k)) for k in sorted(set(recorded) | set(now)) if recorded.get(k) != now.get(k)]


def state_of(manifest: dict, name: str) -> tuple[str, str]:
    """(`done` | `stale` | `running` | `missing`, why): done only when every upstream stage is done and
    unchanged since this one ran."""
    entry = manifest["stages"].get(name)
    if entry is None:
        return "missing", ""
    if entry["status"] == "stale":
        return "stale", f" ({entry.get('reason', 'an upstream stage was redone')})"
    if entry["status"] == "running":
        return "running", f" (started {entry.get('started', '?')} and not finished)"
    for up in GRAPH[name].upstream:
        state, _ = state_of(manifest, up)
        if state != "done":
            return "stale", f" (its input, stage '{up}', is {state})"
        if entry.get("upstream", {}).get(up) != manifest["stages"][up].get("fingerprint"):
            return "stale", f" (stage '{up}' was redone after it)"
    return "done", ""


def require_done(run: RunDir, name: str, manifest: dict | None = None) -> dict:
    """The manifest entry of finished stage `name`; otherwise an error saying what to run."""
    m = manifest if manifest is not None else run.manifest()
    state, why = state_of(m, name)
    if state == "done":
        return m["stages"][name]
    todo = [s for s in (*ancestors(name), name) if state_of(m, s)[0] != "done"]
    commands = list(dict.fromkeys(redo_command(s, force=False) for s in todo))
    raise DataError(f"stage '{name}' of {run.url} is {state}{why}; run {' then '.join(commands)}")


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


class Stage:
    """One stage of one run: `needed()`, then `begin()`, the work, and `done()`.

    `measured`: values found at run time that the outputs depend on (a tokenizer probe); compared like
    settings when the stage itself runs, never by later stages, which cannot measure them.
    """

    def __init__(self, run: RunDir, name: str, cfg: Any, force: Collection[str] = (), measured: dict | None = None):
        self.run, self.name, self.cfg, self.spec = run, name, cfg, GRAPH[name]
        self.settings = settings_of(cfg, self.spec.settings)
        self.layout = settings_of(cfg, self.spec.layout)
        self.measured = json.loads(json.dumps(measured or {}, default=str))
        self.forced = name in force

    @property
    def entry(self) -> dict | None:
        return self.run.manifest()["stages"].get(self.name)

    @property
    def info(self) -> dict:
        return (self.entry or {}).get("info", {})

    def check_upstream(self) -> None:
        """Every upstream stage finished with this config's settings, and its files intact."""
        m = self.run.manifest()
        for up in ancestors(self.name):
            state, why = state_of(m, up)
            if state != "done":
                raise DataError(f"{self.run.url}: stage '{up}' is {state}{why}, and '{self.name}' needs it; run "
                                f"{redo_command(up, force=False)} first")
            diff = changed(m["stages"][up].get("settings", {}), settings_of(self.cfg, GRAPH[up].settings))
            if diff:
                raise ConfigError(self._changed_message(up, diff))
        for up in ancestors(self.name):
            for rel, record in m["stages"][up].get("files", {}).items():
                self.run.verify(rel, record)

    def needed(self) -> bool:
        """False when the stage finished with these settings and its files are intact: a rerun skips it."""
        self.check_upstream()
        m = self.run.manifest()
        entry = m["stages"].get(self.name)
        if self.forced or entry is None or entry["status"] != "done":
            return True
        diff = changed(entry.get("settings", {}), self.settings)
        if self.measured:
            diff += changed(entry.get("measured", {}), self.measured)
        if diff:
            raise ConfigError(self._changed_message(self.name, diff))
        if state_of(m, self.name)[0] != "done":
            return True
        for rel, record in entry.get("files", {}).items():
            self.run.verify(rel, record)
        return False

    def begin(self, extend: bool = False) -> None:
        """Mark the stage running. Every stage downstream is marked stale first, then its outputs removed.

        The stage's own outputs are removed unless it resumes a half-done run of the same settings, or
        `extend`s a finished one (new work added to what is there, as importance does)."""
        m = self.run.manifest()
        entry = m["stages"].get(self.name)
        upstream = {up: m["stages"][up]["fingerprint"] for up in self.spec.upstream}
        fp = fingerprint(self.settings, self.measured, upstream)
        resumable = entry is not None and entry.get("fingerprint") == fp and entry.get("layout") == self.layout
        keep = resumable and not self.forced and (entry["status"] == "running" or extend)
        if entry is not None and entry["status"] == "running" and not keep:
            log.warning("stage %s: discarding half-done work of other settings", self.name)
        stale = [d for d in descendants(self.name) if d in m["stages"] and m["stages"][d]["status"] != "stale"]
        for d in stale:
            m["stages"][d].update(status="stale", reason=f"stage '{self.name}' was redone at {now()}")
        m["stages"][self.name] = {
            "status": "running", "settings": self.settings, "layout": self.layout, "measured": self.measured,
            "upstream": upstream, "fingerprint": fp, "started": now(),
            "files": entry.get("files", {}) if keep else {}, "info": entry.get("info", {}) if keep else {},
        }
        self.run.write_manifest(m)  # stale before anything is removed: an interruption serves nothing old
        for d in stale:
            self._remove(GRAPH[d].outputs)
        if not keep:
            self._remove(self.spec.outputs)

    def done(self, **info: Any) -> None:
        """Record the stage's files and `info`, and mark it done."""
        files = {rel: self.run.file_record(rel) for out in self.spec.outputs if not out.startswith("_work")
                 for rel in self.run.files(out)}
        m = self.run.manifest()
        m["stages"][self.name].update(status="done", files=files, info=info, finished=now())
        self.run.write_manifest(m)
        self._remove([out for out in self.spec.outputs if out.startswith("_work")])
        if not self.run.ls("_work"):
            self.run.remove("_work")

    def _remove(self, outputs: Sequence[str]) -> None:
        for rel in outputs:
            self.run.remove(rel)

    def _changed_message(self, stage: str, diff: list[tuple[str, Any, Any]]) -> str:
        what = "; ".join(f"{k} is {new!r} in this config but was {old!r}" for k, old, new in diff[:4])
        after = descendants(stage)
        also = f" and everything after it ({', '.join(after)})" if after else ""
        return (f"{what} when stage '{stage}' of {self.run.url} ran. Redo '{stage}'{also} with "
                f"{redo_command(stage)}, or use a new run_dir")


def describe_status(run: RunDir) -> str:
    """What `ne status` prints: each stage done, stale, running or missing, with its settings and files."""
    m = run.require_manifest()
    stages = m["stages"]
    families = [f for f in (LM_STAGES, MNIST_STAGES) if any(s in stages for s in f)] or [LM_STAGES]
    lines = [f"{run.url}"]
    for family in families:
        for name in family:
            state, why = state_of(m, name)
            entry = stages.get(name, {})
            when = entry.get("finished") or entry.get("started") or ""
            note = ""
            if state == "done":
                try:
                    for rel, record in entry.get("files", {}).items():
                        run.verify(rel, record)
                    n = len(entry.get("files", {}))
                    note = f"{n} file{'s' * (n != 1)} intact" if n else "writes no file with these settings"
                except DataError as exc:
                    state, note = "damaged", str(exc)
            lines.append(f"  {name:<19} {state:<8} {when:<20} {note or why.strip(' ()')}".rstrip())
            settings = entry.get("settings", {})
            if settings:
                text = ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
                lines += textwrap.wrap(text, 116, initial_indent="      ", subsequent_indent="      ",
                                       break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines)
