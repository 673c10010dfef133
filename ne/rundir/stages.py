"""The one lifecycle every stage of a run follows, over the stage graph `ne.rundir.graph.GRAPH`.

A stage records in the manifest the settings its outputs depend on, its upstream stages' fingerprints, a
record (size, modification time, hash) of every file from outside the run it reads (corpus files, model
weights, an SAE: `INPUT_FILES`), the outputs it claims and a record (size, hash) of every file it wrote.
From these:
- a rerun skips a finished stage, after checking every byte of its files and that its inputs are unchanged;
- a setting changed anywhere upstream, or an input file changed since, is an error naming it and the fix;
- redoing a stage (forced, or because its upstream changed) first runs its checks (`Stage(check=...)`),
  then marks every stage downstream of it stale and removes their outputs, so nothing built on the old
  results is ever served or mixed with new ones;
- a stage removes only what the manifest records as its own: files it recorded, and the outputs it claimed
  while it runs; a file that no stage wrote where a stage would write is an error, never deleted;
- a stage reads its inputs only after checking the upstream files against their records;
- readers take every setting from the stage that made what they read (`config_as_run`), and key what they
  cache by the stage's `version`.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import posixpath
import textwrap
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any

import fsspec

from ne import schema
from ne.errors import ConfigError, DataError, NeError
from ne.rundir.graph import (
    GRAPH,
    LM_STAGES,
    MNIST_STAGES,
    ancestors,
    descendants,
    own_files,
    owner_of,
    redo_command,
)
from ne.rundir.store import MANIFEST, RunDir, fingerprint, input_change, input_record, input_url

log = logging.getLogger(__name__)


def corpus_files(cfg: Any) -> dict[str, str]:
    """data.source `files`: every file data.paths names or matches, in reading order."""
    if cfg.data.source != "files":
        return {}
    from ne.data import input_files

    return {input_url(url): url for url in input_files(cfg.data.paths)}


def model_files(cfg: Any) -> dict[str, str]:
    """The model's weights and config: a safetensors file, or a local Hugging Face directory's. A
    TransformerLens model given by name is resolved by TransformerLens, and not fingerprinted."""
    if cfg.model.backend == "safetensors":
        return {"model.weights": cfg.model.weights}
    if cfg.model.backend == "hf":
        from ne.models.hf import weight_files

        return {f"model.name/{posixpath.basename(path)}": path for path in weight_files(cfg.model.name)}
    return {}


def maxima_inputs(cfg: Any) -> dict[str, str]:
    """The model, and harvest.maxima_file when the maxima are given rather than measured."""
    given = {"harvest.maxima_file": cfg.harvest.maxima_file} if cfg.harvest.maxima_file else {}
    return {**model_files(cfg), **given}


def sae_files(cfg: Any) -> dict[str, str]:
    """The files of the SAE given as sae.path."""
    if not cfg.sae.path:
        return {}
    from ne.models.sae_units import sae_files as files

    return {f"sae.path/{posixpath.basename(url)}": url for url in files(cfg.sae.path)}


def heldout_files(cfg: Any) -> dict[str, str]:
    """The files the held-out text is read from: occurrence.corpus's (source `files`), or with it null the run's
    own corpus files, read again past the harvest's contexts."""
    corpus = cfg.occurrence.corpus
    if corpus is None:
        return corpus_files(cfg)
    if corpus.source != "files":
        return {}
    from ne.data import input_files

    return {input_url(url): url for url in input_files(corpus.paths)}


INPUT_FILES: dict[str, Callable[[Any], dict[str, str]]] = {
    "corpus": corpus_files,
    "model": model_files,
    "maxima": maxima_inputs,
    "sae": sae_files,
    "heldout": heldout_files,
}
"""`StageDef.inputs` names: the files from outside the run a stage reads, as a function of the config ({key:
path or URL}). The key names the file by the setting that gives it (`model.name/config.json`), so a model
found at another path (a package installed elsewhere) is compared by its content."""


def check_force(force: Collection[str], stages: Sequence[str]) -> set[str]:
    """The forced stage names, each one a stage that this command runs; anything else is an error."""
    for name in force:
        if name not in GRAPH:
            raise ConfigError(f"--force {name!r} names no stage; this command's stages are: {', '.join(stages)}")
        if name not in stages:
            raise ConfigError(
                f"--force {name}: stage '{name}' is run by `{GRAPH[name].command}`; this command "
                f"runs {', '.join(stages)}"
            )
    return set(force)


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


def version(manifest: dict, name: str) -> str | None:
    """What a reader keys its caches by: changes whenever stage `name` is redone; None unless it is done."""
    if state_of(manifest, name)[0] != "done":
        return None
    entry = manifest["stages"][name]
    return entry.get("id") or f"{entry['fingerprint']}@{entry.get('finished')}"


def input_changes(entry: dict, now: dict[str, str] | None = None) -> list[str]:
    """The recorded inputs of a stage that changed since it read them, each with how. `now`: where the config
    finds each input today ({key: URL}; default where the stage found it), and the inputs the stage did not
    read. A stage recorded before inputs were has none."""
    recorded = entry.get("inputs")
    if recorded is None:
        return []
    now = now or {}
    out = [
        f"{url} ({why})"
        for key, record in recorded.items()
        if (why := input_change(url := now.get(key, record["path"]), record))
    ]
    return out + [f"{url} (the stage did not read it)" for key, url in now.items() if key not in recorded]


def inputs_now(manifest: dict, name: str) -> dict[str, str] | None:
    """Where the run's config finds stage `name`'s inputs today (a model package may have moved); None when it
    cannot tell (no config, or the model directory is gone: the recorded paths are checked then)."""
    spec = GRAPH[name]
    if spec.inputs is None or "config" not in manifest:
        return None
    from ne.config import RunConfig, from_dict

    try:
        found = INPUT_FILES[spec.inputs](from_dict(RunConfig, config_as_run(manifest, "")))
    except NeError:
        return None
    return {key: input_url(url) for key, url in found.items()}


def inputs_message(run: RunDir, stage: str, changes: list[str]) -> str:
    after = descendants(stage)
    also = f" and everything after it ({', '.join(after)})" if after else ""
    more = f" and {len(changes) - 1} more" if len(changes) > 1 else ""
    return (
        f"{changes[0]}{more}: an input of stage '{stage}' of {run.url} changed since it ran. Redo "
        f"'{stage}'{also} with {redo_command(stage)}, or restore the file"
    )


def changed_inputs(manifest: dict, name: str) -> list[str]:
    """`input_changes` of a recorded stage, its inputs looked for where the run's config finds them today when
    they differ where they were read (a model package installed at another path is compared by content)."""
    entry = manifest["stages"].get(name)
    changes = input_changes(entry) if entry else []
    return input_changes(entry, inputs_now(manifest, name)) if changes else []


def check_inputs(run: RunDir, manifest: dict, names: Sequence[str]) -> None:
    """An error naming the file and the fix when an input of any of stages `names` changed since it ran:
    what a reader checks before it uses an input again (`ne explain` runs the run's model)."""
    for name in names:
        changes = changed_inputs(manifest, name)
        if changes:
            raise DataError(inputs_message(run, name, changes))


def config_as_run(manifest: dict, where: str) -> dict:
    """The config a run's outputs were made with, as a dict: the config recorded by `ne harvest`, each key a
    finished stage depends on set to the value that stage ran with (a stage redone with other settings wins
    over the config recorded before it). `where` names the run in the error when there is no config."""
    if not isinstance(manifest.get("config"), dict):
        raise DataError(
            f"{where}/{MANIFEST} has no config, so the settings the run was made with are unknown; "
            "restore the manifest, or redo the run with `ne harvest --config CONFIG --force contexts`"
        )
    raw = copy.deepcopy(manifest["config"])
    for name in LM_STAGES:
        if state_of(manifest, name)[0] != "done":
            continue
        for key, value in manifest["stages"][name].get("settings", {}).items():
            *sections, leaf = key.split(".")
            node = raw
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
    return raw


def check_not_owned(folder: str, names: Sequence[str], flag: str = "--out", default: str = "") -> None:
    """An error when writing files `names` into `folder` would write where a stage of a run (a folder with a
    manifest, here or above) keeps its outputs: such a file would be replaced, or mixed with a stage's."""
    fs, path = fsspec.core.url_to_fs(folder)
    inside: list[str] = []
    here = path.rstrip("/")
    while here:
        if fs.exists(posixpath.join(here, MANIFEST)):
            for name in names:
                rel = "/".join([*reversed(inside), name])
                stage = owner_of(rel)
                if stage:
                    raise ConfigError(
                        f"{flag} {folder} would overwrite {rel} of the run {here}, which stage "
                        f"'{stage}' writes; give another {flag}" + (f" (default {default})" if default else "")
                    )
            return
        parent = posixpath.dirname(here)
        if parent == here:
            return
        inside.append(posixpath.basename(here))
        here = parent


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
    `check`: everything about this run of the stage that can be checked before its work starts (devices,
    token ids against the vocabulary, given files); `begin` calls it before it marks or removes anything.
    """

    def __init__(
        self,
        run: RunDir,
        name: str,
        cfg: Any,
        force: Collection[str] = (),
        measured: dict | None = None,
        check: Callable[[], Any] | None = None,
    ):
        self.run, self.name, self.cfg, self.spec = run, name, cfg, GRAPH[name]
        self.settings = settings_of(cfg, self.spec.settings)
        self.layout = settings_of(cfg, self.spec.layout)
        self.measured = json.loads(json.dumps(measured or {}, default=str))
        self.forced = name in force
        self.check = check
        found = INPUT_FILES[self.spec.inputs](cfg) if self.spec.inputs else {}
        self.inputs = {key: input_url(url) for key, url in found.items()}

    @property
    def entry(self) -> dict | None:
        return self.run.manifest()["stages"].get(self.name)

    @property
    def info(self) -> dict:
        return (self.entry or {}).get("info", {})

    def check_upstream(self) -> None:
        """Every upstream stage finished with this config's settings and unchanged inputs, and its files there
        (sizes and Parquet footers: the reads verify the bytes they use)."""
        m = self.run.manifest()
        for up in ancestors(self.name):
            state, why = state_of(m, up)
            if state != "done":
                raise DataError(
                    f"{self.run.url}: stage '{up}' is {state}{why}, and '{self.name}' needs it; run "
                    f"{redo_command(up, force=False)} first"
                )
            diff = changed(m["stages"][up].get("settings", {}), settings_of(self.cfg, GRAPH[up].settings))
            if diff:
                raise ConfigError(self._changed_message(up, diff))
        check_inputs(self.run, m, ancestors(self.name))
        for up in ancestors(self.name):
            for rel, record in own_files(up, m["stages"][up]).items():
                self.run.verify(rel, record, deep=False)

    def needed(self) -> bool:
        """False when the stage finished with these settings and inputs, and every byte of its files is
        intact: a rerun skips it."""
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
        changes = input_changes(entry, self.inputs)
        if changes:
            raise DataError(inputs_message(self.run, self.name, changes))
        if state_of(m, self.name)[0] != "done":
            return True
        for rel, record in own_files(self.name, entry).items():
            self.run.verify(rel, record)
        return False

    def begin(self, extend: bool = False) -> None:
        """Check, then mark the stage running. Every stage downstream is marked stale first, then its outputs
        removed.

        The stage's own outputs are removed unless it resumes a half-done run of the same settings, or
        `extend`s a finished one (new work added to what is there, as importance does). Only what the manifest
        records as a stage's own is removed (`_remove`); a file no stage wrote where this one writes is an
        error before anything changes."""
        if self.check is not None:
            self.check()
        m = self.run.manifest()
        entry = m["stages"].get(self.name)
        self._check_foreign(entry)
        inputs = {key: input_record(url) for key, url in self.inputs.items()}
        upstream = {up: m["stages"][up]["fingerprint"] for up in self.spec.upstream}
        hashes = [{key: record["sha256"] for key, record in inputs.items()}] if inputs else []
        fp = fingerprint(self.settings, self.measured, upstream, *hashes)
        resumable = entry is not None and entry.get("fingerprint") == fp and entry.get("layout") == self.layout
        keep = resumable and not self.forced and (entry["status"] == "running" or extend)
        if entry is not None and entry["status"] == "running" and not keep:
            if self.spec.checkpointed and not self.forced:
                raise ConfigError(self._interrupted_message(entry))
            log.warning("stage %s: discarding half-done work of other settings", self.name)
        stale = {
            d: dict(m["stages"][d])
            for d in descendants(self.name)
            if d in m["stages"] and m["stages"][d]["status"] != "stale"
        }  # as they were: what they own
        for d in stale:
            m["stages"][d].update(status="stale", reason=f"stage '{self.name}' was redone at {now()}")
        m["stages"][self.name] = {
            "status": "running",
            "settings": self.settings,
            "layout": self.layout,
            "measured": self.measured,
            "inputs": inputs,
            "upstream": upstream,
            "fingerprint": fp,
            "id": uuid.uuid4().hex[:12],
            "started": now(),
            "claimed": [out for out in self.spec.outputs if not out.startswith(schema.WORK_DIR)],
            "files": entry.get("files", {}) if keep else {},
            "info": entry.get("info", {}) if keep else {},
        }
        self.run.write_manifest(m)  # stale before anything is removed: an interruption serves nothing old
        for d, before in stale.items():
            self._remove(d, before)
        if not keep:
            self._remove(self.name, entry)

    def done(self, **info: Any) -> None:
        """Record the stage's files and `info`, and mark it done."""
        files = {
            rel: self.run.file_record(rel)
            for out in self.spec.outputs
            if not out.startswith(schema.WORK_DIR)
            for rel in self.run.files(out)
        }
        m = self.run.manifest()
        m["stages"][self.name].update(status="done", files=files, info=info, finished=now())
        self.run.write_manifest(m)
        for out in self.spec.outputs:
            if out.startswith(schema.WORK_DIR):
                self.run.remove(out)
        if not self.run.ls(schema.WORK_DIR):
            self.run.remove(schema.WORK_DIR)

    def _check_foreign(self, entry: dict | None) -> None:
        """An error when a file that no stage of this run wrote lies where this stage writes its outputs."""
        owned = _owned(self.name, entry)
        for out in self.spec.outputs:
            if out.startswith(schema.WORK_DIR) or out in owned["claimed"]:
                continue
            foreign = [rel for rel in self.run.files(out) if rel not in owned["files"]]
            if foreign:
                raise DataError(
                    f"{self.run.path(foreign[0])} was not written by this run (the manifest records no "
                    f"such file), and stage '{self.name}' writes {out}; move it out of {self.run.url}, "
                    "or use a new run_dir"
                )

    def _remove(self, name: str, entry: dict | None) -> None:
        """Remove what the manifest records as stage `name`'s own: its `_work` paths, the outputs it claimed
        while it runs (half-done work has no records yet), and otherwise only the files it recorded."""
        owned = _owned(name, entry)
        for out in GRAPH[name].outputs:
            if out.startswith(schema.WORK_DIR) or out in owned["claimed"]:
                self.run.remove(out)
                continue
            for rel in owned["files"]:
                if rel == out or rel.startswith(out.rstrip("/") + "/"):
                    self.run.remove(rel)
            if self.run.exists(out) and not self.run.files(out):
                self.run.remove(out)  # folders left empty

    def _interrupted_message(self, entry: dict) -> str:
        diff = changed(entry.get("settings", {}), self.settings)
        what = (
            "; ".join(f"{k} is {new!r} in this config but was {old!r}" for k, old, new in diff[:4])
            or "its inputs changed"
        )
        return (
            f"{what} when stage '{self.name}' of {self.run.url} was interrupted; resume it with the settings it "
            f"started with, or start it over with {redo_command(self.name)}, or use a new run_dir"
        )

    def _changed_message(self, stage: str, diff: list[tuple[str, Any, Any]]) -> str:
        what = "; ".join(f"{k} is {new!r} in this config but was {old!r}" for k, old, new in diff[:4])
        after = descendants(stage)
        also = f" and everything after it ({', '.join(after)})" if after else ""
        return (
            f"{what} when stage '{stage}' of {self.run.url} ran. Redo '{stage}'{also} with "
            f"{redo_command(stage)}, or use a new run_dir"
        )


def _owned(name: str, entry: dict | None) -> dict:
    """What the manifest records as stage `name`'s own: the `files` it recorded, and the outputs it `claimed`
    while it is running (an entry from before claims were recorded: every output, as ne then wrote them)."""
    if entry is None:
        return {"files": set(), "claimed": set()}
    claimed = entry.get("claimed", GRAPH[name].outputs) if entry["status"] == "running" else ()
    return {"files": set(entry.get("files", {})), "claimed": set(claimed)}


def describe_status(run: RunDir) -> str:
    """What `ne status` prints: each stage done, stale, running or missing, with its settings and files."""
    m = run.require_manifest()
    stages = m["stages"]
    families = [f for f in (LM_STAGES, MNIST_STAGES) if any(s in stages for s in f)] or [LM_STAGES]
    lines = [f"{run.url}"]
    sae = stages.get("sae", {}).get("settings", {})
    has_sae = bool(sae.get("sae.path") or sae.get("sae.train_hook"))
    for family in families:
        for name in family:
            if name == "sae_eval" and not has_sae and name not in stages:
                continue  # a run of MLP neurons has no SAE to evaluate
            state, why = state_of(m, name)
            entry = stages.get(name, {})
            when = entry.get("finished") or entry.get("started") or ""
            note = ""
            if state == "done":
                try:
                    for rel, record in own_files(name, entry).items():
                        run.verify(rel, record)  # every byte
                    n = len(own_files(name, entry))
                    note = f"{n} file{'s' * (n != 1)} intact" if n else "writes no file with these settings"
                except DataError as exc:
                    state, note = "damaged", str(exc)
                changes = changed_inputs(m, name) if state == "done" else []
                if changes:
                    state, note = "changed", inputs_message(run, name, changes)
            lines.append(f"  {name:<19} {state:<8} {when:<20} {note or why.strip(' ()')}".rstrip())
            settings = entry.get("settings", {})
            if settings:
                text = ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
                lines += textwrap.wrap(
                    text,
                    116,
                    initial_indent="      ",
                    subsequent_indent="      ",
                    break_on_hyphens=False,
                    break_long_words=False,
                )
    return "\n".join(lines)
