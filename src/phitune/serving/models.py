"""The models one `phitune serve` answers for: names -> registered versions -> peft adapters.

    phitune serve models:/support@champion models:/support@challenger runs:/<RUN_ID>/model
    phitune serve --registered support --follow 30

Each base model is loaded once and each adapter once, into one peft model that holds
every adapter under its own name (ChatGenerator.add_adapter); a request's `model`
picks an entry, and the generator activates that entry's adapter (GenParams.adapter)
on the worker thread before generating. Names: `NAME@ALIAS` and `NAME/VERSION` for
registered models, the run id for runs:/ID/model (`ID/PATH` for another path in the
run), the folder's name for a folder. One MODEL_URI keeps the one name it always had
(--served-name, else the registered model's name), and a request naming no model gets it.

--follow SECONDS: a thread re-resolves each alias (and `latest`) every SECONDS. A
version that moved is recorded in the deployment, downloaded and loaded as a new
adapter while the old one keeps answering; then the entry switches to it in one step
under `lock`, the same lock under which a request takes its adapter and is queued, so
every request is answered by one whole version, the old or the new. The old adapter is
unloaded (and dropped from the deployment record) once no request is queued or
running: none can hold its name then.

Supported: LoRA adapters of one base model. Among several URIs, a second base, a fully
fine-tuned model or a bare base is refused at start (run one `phitune serve` per base);
a followed alias that moves to such a version is not swapped in (a warning; the old
version keeps serving).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from phitune.errors import PhituneError

log = logging.getLogger("phitune.serving")
_FOLLOWED = re.compile(r"^models:/[^/@]+(@[^/@]+|/latest)/?$")  # URIs whose version can move
# What identifies a base's weights (a shipped base's `path` is just where it was downloaded).
_BASE_IDENTITY = ("name", "builtin", "hub_id", "revision", "local_path", "torch_dtype", "context_length")


@dataclass(frozen=True)
class Loaded:
    """One version in memory: its source and the peft adapter holding it (None: the model itself)."""
    source: object  # phitune.models.uri.ModelSource
    adapter: Optional[str]
    workdir: Optional[Path] = None  # its download, removed when it is unloaded (versions loaded by --follow)

    @property
    def key(self) -> str:
        return self.source.resolved_uri


@dataclass(frozen=True)
class Entry:
    """A name clients ask for, and the version that answers it now. Replaced whole on a swap."""
    name: str
    uri: Optional[str]  # as given on the command line
    loaded: Loaded

    @property
    def adapter(self) -> Optional[str]:
        return self.loaded.adapter

    @property
    def info(self) -> dict:
        """Fields for /v1/models, the request log and traces (those known)."""
        s = self.loaded.source
        known = {"version": s.model_version, "uri": self.uri, "resolved_uri": s.resolved_uri}
        return {k: v for k, v in known.items() if v is not None}


def served_name(uri: str, source) -> str:
    """The name a model gets among several: NAME@ALIAS, NAME/VERSION, RUN_ID[/PATH], a folder's name."""
    uri = uri.rstrip("/")
    if uri.startswith("models:/"):
        return uri[len("models:/"):]
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        return run_id if path in ("", "model") else f"{run_id}/{path}"
    return Path(uri).name or source.served_name


def base_key(source) -> str:
    ref = source.base_ref
    key = {k: ref.get(k) for k in _BASE_IDENTITY}
    if not ref.get("shipped"):
        key["path"] = ref.get("path")
    return json.dumps(key, sort_keys=True, default=str)


def _kind(source) -> Optional[str]:
    """What keeps a model out of a shared peft model (None: a chat LoRA adapter, it can join)."""
    folder = Path(source.adapter_dir) if source.adapter_dir else None
    if folder is None:
        return "a bare base model"
    if (folder / "labels.json").is_file():
        return "a classifier"
    return None if (folder / "adapter_config.json").is_file() else "a fully fine-tuned model"


def check_joinable(first, other) -> None:
    """PhituneError unless `other` is a LoRA adapter of `first`'s base (what one peft model can hold)."""
    for s in (first, other):
        if kind := _kind(s):
            raise PhituneError(f"{s.uri}: {kind}, not a LoRA adapter; several models are served as adapters of one "
                               "base (serve this one on its own)")
    if base_key(first) != base_key(other):
        raise PhituneError(f"{other.uri}: its base model ({other.base_ref.get('name')}) is not the base of "
                           f"{first.uri} ({first.base_ref.get('name')}); one `phitune serve` serves adapters of "
                           "one base: run one per base")


def registered_uris(name: str, tracking_uri: str) -> list[str]:
    """models:/NAME@ALIAS for every alias of a registered model (sorted by alias)."""
    from phitune.models.uri import _mlflow_call, client_for

    client = client_for(tracking_uri)
    model = _mlflow_call(f"--registered {name}: no registered model {name!r}", client.get_registered_model, name)
    if not model.aliases:
        raise PhituneError(f"--registered {name}: no version of {name!r} has an alias (set one with `phitune promote` "
                           "or MlflowClient.set_registered_model_alias), or name versions as models:/NAME/VERSION")
    return [f"models:/{name}@{alias}" for alias in sorted(model.aliases)]


class ModelSet:
    """Served names -> entries, the generator holding their adapters, and --follow.

    `pick(name)` and queueing the request happen under `lock` (ChatService), and so does
    each swap: a request never sees half of one."""

    def __init__(self, generator, entries: list[Entry], single: bool = False, tracking_uri: Optional[str] = None):
        self.generator, self.tracking_uri = generator, tracking_uri
        self.single = single  # one MODEL_URI, under the one name `phitune serve` always gave it
        self.lock = threading.Lock()
        self._entries = {e.name: e for e in entries}
        self._loaded = {e.loaded.key: e.loaded for e in entries}
        self._loading: Optional[dict] = None  # the version being loaded now (already in the deployment record)
        self._adapters = 0  # adapter names handed out
        # Whether requests name their adapter: only once a second version was loaded. Until
        # then the one adapter is the active one and a request passes None, as it always did.
        self.named = len(self._loaded) > 1
        self._warned: dict = {}  # name -> the last --follow warning about it (said once, not every tick)
        self._refused: set = set()  # (name, version) that cannot join this model: not downloaded again
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.on_change: Callable[[list], None] = lambda held: None  # gets records() when the held versions change

    @classmethod
    def single_model(cls, generator, name: str, info: dict | None = None) -> "ModelSet":
        """One model already loaded (build_app's callers that pass a generator alone)."""
        from phitune.models.uri import ModelSource

        info = info or {}
        source = ModelSource(info.get("uri") or name, info.get("resolved_uri") or info.get("uri"), "folder", {}, None,
                             model_version=info.get("version"))
        return cls(generator, [Entry(name, info.get("uri"), Loaded(source, _active_adapter(generator)))], single=True)

    # -- lookups (event loop) ---------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def adapter(self, entry: Entry) -> Optional[str]:
        """GenParams.adapter for a request to `entry` (call with `lock` held)."""
        return entry.adapter if self.named else None

    def pick(self, name: Optional[str]) -> Optional[Entry]:
        """The entry for a request's `model` (None: the only model, when one is served)."""
        if name is None:
            return next(iter(self._entries.values())) if len(self._entries) == 1 else None
        return self._entries.get(name)

    def records(self) -> list[dict]:
        """Every version held (loaded, or being loaded), for the deployment record."""
        by_key: dict = {}
        for e in self.entries():
            by_key.setdefault(e.loaded.key, []).append(e.name)
        held = [_record(loaded.source, by_key.get(key, [])) for key, loaded in list(self._loaded.items())]
        return held + ([self._loading] if self._loading else [])

    # -- --follow (its own thread) --------------------------------------------------------------
    def follow(self, seconds: float, idle: Callable[[], bool]) -> None:
        """Re-resolve moving URIs every `seconds`; unload what is replaced once `idle()` (nothing queued or running)."""
        def loop():
            while not self._stop.wait(seconds):
                try:
                    self.refresh()
                    self.collect(idle)
                except Exception:  # a bug must not stop the server from serving what it has
                    log.exception("--follow: checking the registry failed")

        self._thread = threading.Thread(target=loop, name="phitune-follow", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def refresh(self) -> list[str]:
        """Swap in every moved version that can be loaded; the names swapped."""
        from phitune.models.uri import client_for, registered_version

        client, swapped = client_for(self.tracking_uri), []
        for entry in self.entries():
            if not (entry.uri and _FOLLOWED.match(entry.uri)):
                continue
            try:
                name, mv = registered_version(entry.uri, client)
                version = str(mv.version)
                if version != str(entry.loaded.source.model_version) and (entry.name, version) not in self._refused:
                    self._swap(entry, name, version)
                    swapped.append(entry.name)
            except PhituneError as exc:
                self._warn(entry, str(exc))
        return swapped

    def _warn(self, entry: Entry, why: str) -> None:
        if self._warned.get(entry.name) != why:
            self._warned[entry.name] = why
            log.warning("--follow: %s keeps serving version %s: %s", entry.name, entry.loaded.source.model_version, why)

    def _swap(self, entry: Entry, model_name: str, version: str) -> None:
        loaded = self._load(model_name, version)
        with self.lock:
            self._entries[entry.name] = replace(entry, loaded=loaded)
        self.on_change(self.records())
        log.warning("--follow: %s now answers with %s version %s (was %s)", entry.name, model_name, version,
                    entry.loaded.source.model_version)

    def _load(self, model_name: str, version: str) -> Loaded:
        from phitune.models.uri import resolve

        pinned = f"models:/{model_name}/{version}"
        if pinned in self._loaded:  # already held (another alias points at it)
            return self._loaded[pinned]
        self._loading = {"model_name": model_name, "model_version": version, "model_uri": pinned,
                         "resolved_uri": pinned, "served_model": []}
        self.on_change(self.records())  # recorded before the download: the delete guard covers it from now on
        workdir = Path(tempfile.mkdtemp(prefix="phitune-follow-"))
        try:
            source = resolve(pinned, self.tracking_uri, workdir)
            try:
                check_joinable(next(iter(self._loaded.values())).source, source)
            except PhituneError:
                self._refused.update((e.name, version) for e in self.entries())  # it will not fit next time either
                raise
            adapter = self.new_adapter_name()
            self.generator.add_adapter(adapter, source.adapter_dir)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            self._loading = None
            self.on_change(self.records())  # not held after all
            raise
        self._loading = None
        loaded = Loaded(source, adapter, workdir)
        with self.lock:  # from here on requests name their adapter: two are loaded
            self._loaded[loaded.key] = loaded
            self.named = True
        return loaded

    def collect(self, idle: Callable[[], bool]) -> list[str]:
        """Unload versions no entry uses, when idle() says no request is queued or running."""
        with self.lock:
            used = {e.loaded.key for e in self._entries.values()}
            unused = [v for k, v in self._loaded.items() if k not in used]
            if not unused or not idle():
                return []
            for v in unused:
                del self._loaded[v.key]
        for v in unused:  # no request can name these adapters any more
            if v.adapter is not None:
                self.generator.remove_adapter(v.adapter)
            if v.workdir is not None:
                shutil.rmtree(v.workdir, ignore_errors=True)
        self.on_change(self.records())
        return [v.key for v in unused]

    def new_adapter_name(self) -> str:
        self._adapters += 1
        return f"served-{self._adapters}"  # peft adapter names are module keys: no dots


def followed(models: ModelSet) -> list[str]:
    """Names whose URI can move (an alias or `latest`): what --follow re-resolves."""
    return [e.name for e in models.entries() if e.uri and _FOLLOWED.match(e.uri)]


def _active_adapter(generator) -> Optional[str]:
    active = getattr(getattr(generator, "model", None), "active_adapter", None)
    return active if isinstance(active, str) else None


def _record(source, names: list[str]) -> dict:
    return {"model_name": source.model_name, "model_version": source.model_version, "model_uri": source.uri,
            "resolved_uri": source.resolved_uri, "run_id": source.run_id, "served_model": names}


def load_models(uris: list[str], sources: list, tracking_uri: str, served_as: Optional[str] = None,
                single: bool = True) -> ModelSet:
    """Load resolved models (phitune.models.uri.resolve): one base, one peft model, one adapter
    per distinct version. single: one URI, named as `phitune serve` always named it (served_as,
    else the registered name); otherwise NAME@ALIAS, NAME/VERSION, RUN_ID (served_name)."""
    from phitune.modeling.generate import load_generator

    if single and len(uris) == 1:
        names = [served_as or sources[0].served_name]
    else:
        if served_as:
            raise PhituneError("--served-name names the model of a single MODEL_URI; several models are named "
                               "NAME@ALIAS, NAME/VERSION or their run id")
        names = [served_name(u, s) for u, s in zip(uris, sources)]
        for s in sources[1:]:
            check_joinable(sources[0], s)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PhituneError(f"{', '.join(dupes)}: given more than once")
    generator = load_generator(sources[0])
    models = ModelSet(generator, [], single=single and len(uris) == 1, tracking_uri=tracking_uri)
    models._loaded[sources[0].resolved_uri] = Loaded(sources[0], _active_adapter(generator))
    for uri, source, name in zip(uris, sources, names):
        loaded = models._loaded.get(source.resolved_uri)
        if loaded is None:  # a version not loaded yet: one more adapter on the same base
            adapter = models.new_adapter_name()
            generator.add_adapter(adapter, source.adapter_dir)
            loaded = models._loaded[source.resolved_uri] = Loaded(source, adapter)
        models._entries[name] = Entry(name, uri, loaded)
    models.named = len(models._loaded) > 1
    return models
