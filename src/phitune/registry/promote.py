"""`phitune promote`: register the best finished run's model, and move @champion only when it wins.

Candidates are finished training runs (not pruned, failed or killed) and, with
`--checkpoint`, each of their kept epoch checkpoints (as Azure's and OpenAI's
deployable checkpoints are):

  last  (default) the run's final MLflow model (its last kept epoch if it logged no model),
                  valued by the run's metric;
  best            every kept epoch, valued by checkpoints/epoch-NNN/metrics.json;
  N               epoch N of each run.

The best candidate becomes a new version of the registered model with a few tags, what
a registry table needs (its run id, checkpoint, the metric and its value
`metric.<name>`, the validation data digest `phitune.valid_digest`, the base model,
the trial and sweep), and a one-sentence description (base model, data,
hyperparameters, metric, the serve command); everything else stays on the run. An epoch checkpoint that is not
the final model is first logged as a phitune chat model into its source run
(`log_chat_model`, named `checkpoint-epoch-NNN`: MLflow 3 model names cannot hold "/").

The gate: with no current @champion (the `--alias`), the new version takes it. With
one, both must have been validated on the same data (same `phitune.valid_digest`),
else the comparison is refused (exit 1, nothing registered) unless `--force`. On the
same data the alias moves only when the new version is strictly better on the
metric; otherwise the version gets @challenger and the reason is printed. `--force`
skips the gate: the alias moves whatever the data or the values.
Promoting the same run and checkpoint again reuses its version.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from phitune.errors import PhituneError
from phitune.registry import store

CHALLENGER = "challenger"
DIGEST_TAG = "phitune.valid_digest"
METRIC_TAG = "metric."  # version tag prefix: metric.full_valid_loss = 1.234
# run tags copied onto the version: the gate's data digest, the base model, the trial
VERSION_RUN_TAGS = (DIGEST_TAG, "phitune.model", "phitune.trial_number")


@dataclass
class Candidate:
    run: object  # mlflow Run
    checkpoint: str  # "final" or "epoch-NNN"
    epoch: Optional[int]
    value: float
    metrics: dict  # of this checkpoint
    final: bool  # the run's logged `model` is this checkpoint's weights

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def describe(self) -> str:
        trial = store.trial_number(self.run)
        where = f"run {self.run_id}" + (f" (trial {trial})" if trial is not None else "")
        return where + (f", {self.checkpoint}" if self.checkpoint != "final" else ", final model")


@dataclass
class PromoteResult:
    name: str
    version: Optional[str] = None
    alias: Optional[str] = None  # the alias it got: the requested one, "challenger", or None (refused)
    previous: Optional[str] = None  # the version the alias pointed to before
    reused: bool = False
    refused: bool = False
    forced: bool = False
    lines: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.refused else 0


# -- candidates -----------------------------------------------------------------------------
def _epoch_dirs(client, run_id: str) -> list[str]:
    return sorted(a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "checkpoints")
                  if a.is_dir and a.path.rsplit("/", 1)[-1].startswith("epoch-"))


def _epoch_metrics(client, run_id: str, epoch_dir: str, workdir: Path) -> Optional[dict]:
    from mlflow.exceptions import MlflowException

    from phitune.models.uri import quiet_downloads

    try:
        with quiet_downloads():
            path = client.download_artifacts(run_id, f"checkpoints/{epoch_dir}/metrics.json",
                                             str(_fresh(workdir / run_id / epoch_dir)))
        return json.loads(Path(path).read_text())
    except (MlflowException, OSError, ValueError):
        return None


def _fresh(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _has_model(client, run) -> bool:
    return _logged_model_id(client, run, "model") is not None


def _logged_model_id(client, run, name: str, servable: bool = False) -> Optional[str]:
    """The run's LoggedModel called `name`; servable: only one with model files (an epoch's
    LoggedModel from training has none until promote logs them into it)."""
    from phitune.tracking.pyfunc_model import CHECKPOINT_MODEL_TYPE

    outputs = getattr(run, "outputs", None)
    for out in (outputs.model_outputs if outputs is not None and outputs.model_outputs else []):
        try:
            model = client.get_logged_model(out.model_id)
        except Exception:  # a deleted logged model
            continue
        if model.name == name and not (servable and model.model_type == CHECKPOINT_MODEL_TYPE
                                       and not _has_files(client, model.model_id)):
            return out.model_id
    return None


def _has_files(client, model_id: str) -> bool:
    return any(f.path == "MLmodel" for f in client.list_logged_model_artifacts(model_id))


def _final_step(client, run_id: str) -> Optional[int]:
    history = client.get_metric_history(run_id, "epoch")
    return max((m.step for m in history), default=None)


def _finite(value) -> Optional[float]:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def candidates(client, runs: list, metric: str, checkpoint: str, workdir: Path,
               note: Callable[[str], None] = lambda s: None) -> list[Candidate]:
    """Every promotable (run, checkpoint) with a finite value of `metric`."""
    out: list[Candidate] = []
    for run in runs:
        if store.run_state(run) != "finished":
            continue
        rid = run.info.run_id
        has_model = _has_model(client, run)
        final_cand = None
        if has_model and checkpoint in ("last", "best"):  # the run's final weights are always a candidate
            value = _finite(run.data.metrics.get(metric))
            if value is None:
                note(f"run {rid}: no {metric}; skipped")
            else:
                final_cand = Candidate(run, "final", None, value, dict(run.data.metrics), final=True)
                out.append(final_cand)
        if checkpoint == "last" and has_model:
            continue
        epochs = _epoch_dirs(client, rid)
        if checkpoint == "last":
            epochs = epochs[-1:]  # no logged model: its last kept epoch
        elif checkpoint != "best":
            epochs = [e for e in epochs if e == f"epoch-{int(checkpoint):03d}"]
            if not epochs:
                note(f"run {rid}: no kept checkpoint epoch-{int(checkpoint):03d}; skipped")
        final_step = _final_step(client, rid) if has_model else None
        for epoch_dir in epochs:
            m = _epoch_metrics(client, rid, epoch_dir, workdir)
            value = _finite((m or {}).get(metric))
            if value is None:
                note(f"run {rid} {epoch_dir}: no {metric} in its metrics.json; skipped")
                continue
            epoch = int(m.get("epoch") or epoch_dir[len("epoch-"):])
            final = has_model and final_step is not None and int(m.get("step", -1)) == final_step
            if final and final_cand is not None:
                final_cand.epoch = epoch  # the same weights as the run's model: one candidate
                continue
            out.append(Candidate(run, "final" if final else epoch_dir, epoch, value, m, final=final))
    return out


def pick_best(cands: list[Candidate], direction: str) -> Candidate:
    # ties: the earlier run and checkpoint (stable sort over the search order)
    return sorted(cands, key=lambda c: c.value if direction == "min" else -c.value)[0]


# -- registering ----------------------------------------------------------------------------
def checkpoint_model_uri(client, cand: Candidate, workdir: Path) -> str:
    """models:/<id> of a phitune chat model for the candidate; an epoch checkpoint is
    logged into its source run first (reused when already there)."""
    run_id = cand.run_id
    if cand.final:
        model_id = _logged_model_id(client, cand.run, "model")
        return f"models:/{model_id}"
    name = f"checkpoint-{cand.checkpoint}"
    run = client.get_run(run_id)
    existing = _logged_model_id(client, run, name, servable=True)
    if existing:
        return f"models:/{existing}"
    epoch_model = _logged_model_id(client, run, name)  # the epoch's LoggedModel: the files go into it
    import logging
    import warnings

    import mlflow

    from phitune.evaluation.run import quiet_libraries
    from phitune.models.uri import quiet_downloads, run_base_reference
    if mlflow.active_run() is not None:
        raise PhituneError("promote: another MLflow run is active in this process; cannot log the checkpoint's model")
    quiet_libraries()
    with quiet_downloads():
        adapter = Path(client.download_artifacts(run_id, f"checkpoints/{cand.checkpoint}",
                                                 str(_fresh(workdir / "ckpt" / run_id))))
    (adapter / "metrics.json").unlink(missing_ok=True)  # the model folder holds the adapter only
    base = run_base_reference(run_id, workdir / "base" / run_id)
    status = client.get_run(run_id).info.status
    print(f"logging {cand.checkpoint} of run {run_id} as the MLflow model {name} (loads it once to check it)",
          file=sys.stderr)
    if not epoch_model:  # a new LoggedModel, linked to the run: MLflow wants it active
        mlflow.start_run(run_id=run_id)
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    try:
        mlflow_logger.setLevel(logging.ERROR)  # CloudPickle / ChatParams notices of every pyfunc log
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # ChatModel's deprecation in MLflow 3
            info = _log_model_of_task(run, base, adapter, name, cand.metrics, epoch_model)
    finally:
        mlflow_logger.setLevel(level)
        if mlflow.active_run() is not None:
            mlflow.end_run(status=status)  # leave the source run as it was (FINISHED)
    return f"models:/{info.model_id}"


def _log_model_of_task(run, base: dict, adapter: Path, name: str, metrics: dict, model_id: Optional[str] = None):
    """The checkpoint as the MLflow model its run's task logs (chat, or a classifier), with the
    epoch's metrics (metrics.json) at the epoch's step, or into the epoch's LoggedModel
    `model_id` that training made."""
    from phitune.tasks import TASK_TAG

    if run.data.tags.get(TASK_TAG) == "classification":
        from phitune.classify.pyfunc import log_classifier_model as log
    else:
        from phitune.tracking.pyfunc_model import log_chat_model as log
    return log(base, adapter, name=name, metrics=metrics, step=metrics.get("step"), model_id=model_id)


def version_tags(cand: Candidate, metric: str, parent_id: Optional[str]) -> dict:
    """What a registry table needs to tell versions apart and gate them, nothing more (at most
    9 with phitune.gate): the run has the rest (params, all metrics, config, digests)."""
    tags = {"phitune.run_id": cand.run_id, "phitune.checkpoint": cand.checkpoint, "phitune.metric": metric,
            f"{METRIC_TAG}{metric}": repr(cand.value)}
    for key in VERSION_RUN_TAGS:
        if cand.run.data.tags.get(key):
            tags[key] = cand.run.data.tags[key]
    if parent_id:
        tags["phitune.sweep"] = parent_id
    return tags


def version_description(cand: Candidate, metric: str, name: str, version: str) -> str:
    """One sentence for a person: base model, data, hyperparameters, metric, how to serve it."""
    params, tags = cand.run.data.params, cand.run.data.tags
    base = tags.get("phitune.model") or params.get("model.name") or "the base model"
    method = {"lora": "LoRA", "full": "full"}.get(params.get("train.method", "lora"), params.get("train.method"))
    data = params.get("data.name") or Path(params.get("data.train_file") or "").stem or "its data"
    hyper = [f"{label} {params[key]}" for key, label in (("train.learning_rate_multiplier", "learning rate x"),
                                                         ("train.batch_size_multiplier", "batch size x"),
                                                         ("derived.epochs", "epochs")) if params.get(key)]
    trial = store.trial_number(cand.run)
    where = (f"epoch {cand.epoch}" if cand.checkpoint != "final" else "the final model") + \
        f" of run {cand.run_id[:12]}" + (f" (trial {trial})" if trial is not None else "")
    return (f"{base} fine-tuned ({method}) on {data}" + (f" ({', '.join(hyper)})" if hyper else "")
            + f": {metric} {cand.value:.4g} on validation data {_short(tags.get(DIGEST_TAG))}, {where}; "
            f"serve it with phitune serve models:/{name}/{version}")


def _version_value(client, mv, metric: str, workdir: Path) -> Optional[float]:
    """A version's value of `metric`: its tag, else (promoted by another metric) its source's."""
    value = _finite(mv.tags.get(f"{METRIC_TAG}{metric}"))
    if value is not None or not mv.run_id:
        return value
    from mlflow.exceptions import MlflowException

    checkpoint = mv.tags.get("phitune.checkpoint", "final")
    try:
        if checkpoint == "final":
            return _finite(client.get_run(mv.run_id).data.metrics.get(metric))
    except MlflowException:
        return None
    return _finite((_epoch_metrics(client, mv.run_id, checkpoint, workdir / "champion") or {}).get(metric))


def _find_version(client, name: str, run_id: str, checkpoint: str):
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("phitune.run_id") == run_id and mv.tags.get("phitune.checkpoint") == checkpoint:
            return mv
    return None


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="A phitune fine-tuned chat model "
                                                        "(phitune promote; serve: phitune serve models:/NAME@champion)")


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _short(digest: Optional[str]) -> str:
    return (digest or "none")[:12]


def promote(client, *, name: str, runs: list, metric: Optional[str] = None, direction: Optional[str] = None,
            alias: str = "champion", checkpoint: str = "last", force: bool = False, parent_id: Optional[str] = None,
            say: Callable[[str], None] = print) -> PromoteResult:
    """Register the best candidate of `runs` as a version of `name` and apply the gate;
    metric None: the runs' task's (full_valid_loss; full_valid_macro_f1 for classification)."""
    from mlflow.utils.validation import (_validate_model_alias_name, _validate_model_alias_name_reserved,
                                         _validate_model_name)

    metric = metric or store.task_metric(runs)
    store.check_metric(runs, metric)
    direction = store.direction_for(metric, direction)
    if checkpoint not in ("best", "last") and not str(checkpoint).isdigit():
        raise PhituneError(f"--checkpoint {checkpoint}: expected best, last or an epoch number")
    if alias == CHALLENGER:
        raise PhituneError(f"--alias {CHALLENGER} is where versions that lose the gate go; pick another alias")
    try:
        _validate_model_name(name)
    except Exception as exc:
        raise PhituneError(f"--name {name}: {exc}") from None
    try:  # before anything is registered: MLflow refuses such an alias only when it is set
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except Exception as exc:
        raise PhituneError(f"--alias {alias}: {getattr(exc, 'message', exc)}") from None
    result = PromoteResult(name=name)

    def out(line: str) -> None:
        result.lines.append(line)
        say(line)

    with tempfile.TemporaryDirectory(prefix="phitune-promote-") as tmp:
        workdir = Path(tmp)
        skipped = [r for r in runs if store.run_state(r) != "finished"]
        cands = candidates(client, runs, metric, str(checkpoint), workdir,
                           note=lambda s: print(f"note: {s}", file=sys.stderr))
        if not cands:
            why = f"; {len(skipped)} pruned/failed/killed/running run(s) left out" if skipped else ""
            raise PhituneError(f"no finished run with {metric} to promote"
                               + (f" at checkpoint {checkpoint}" if checkpoint not in ("last",) else "") + why)
        best = pick_best(cands, direction)
        out(f"best of {len(cands)} candidate(s) by {metric} ({'lower' if direction == 'min' else 'higher'} is better): "
            f"{best.describe()}, {metric} {best.value:.6g}")
        digest = best.run.data.tags.get(DIGEST_TAG) or ""
        champion = _alias_version(client, name, alias)
        existing = _find_version(client, name, best.run_id, best.checkpoint)

        if champion is not None and existing is not None and champion.version == existing.version:
            out(f"{name} version {existing.version} is this run and checkpoint, and already @{alias}; nothing to do")
            result.version, result.alias, result.previous, result.reused = existing.version, alias, existing.version, True
            return result

        # the gate, decided before anything is registered
        verdict, reason = "take", f"no @{alias} yet"
        if champion is not None:
            c_digest = champion.tags.get(DIGEST_TAG) or ""
            c_value = _version_value(client, champion, metric, workdir)
            if not digest or not c_digest or digest != c_digest:
                reason = (f"the validation data differ: @{alias} (version {champion.version}) was validated on data "
                          f"digest {_short(c_digest)}, this run on {_short(digest)}; their {metric} values are not "
                          "comparable")
                verdict = "force" if force else "refuse"
            elif c_value is None:
                reason = f"@{alias} (version {champion.version}) has no {metric} to compare with"
                verdict = "force" if force else "refuse"
            elif store.better(best.value, c_value, direction):
                verdict, reason = "take", (f"{metric} {best.value:.6g} beats {c_value:.6g} of version "
                                           f"{champion.version} on the same validation data ({_short(digest)})")
            else:
                reason = (f"{metric} {best.value:.6g} does not beat {c_value:.6g} of @{alias} (version "
                          f"{champion.version}) on the same validation data ({_short(digest)})")
                verdict = "force" if force else "challenger"
        if verdict == "refuse":
            result.refused = True
            out(f"refused: {reason}. Nothing registered. Evaluate both on the same file "
                f"(phitune eval models:/{name}@{alias} --data FILE) or re-run with --force to promote it anyway.")
            return result

        if existing is not None:
            version = existing
            result.reused = True
            out(f"{name} version {version.version} already holds {best.describe()}; reusing it")
        else:
            _ensure_registered_model(client, name)
            source = checkpoint_model_uri(client, best, workdir)
            version = client.create_model_version(name, source, run_id=best.run_id, model_id=source[len("models:/"):],
                                                  tags=version_tags(best, metric, parent_id))
            version = client.update_model_version(  # the sentence names the version it describes
                name, version.version, description=version_description(best, metric, name, version.version))
            out(f"registered {name} version {version.version} from {source} ({best.describe()})")
        result.version = version.version

        if verdict in ("take", "force"):
            result.previous = champion.version if champion is not None else None
            result.forced = verdict == "force"
            client.set_registered_model_alias(name, alias, version.version)
            client.set_model_version_tag(name, version.version, "phitune.gate",
                                         "forced" if result.forced else alias)
            result.alias = alias
            if result.forced:
                out(f"forced (--force): {reason}")
            else:
                out(f"gate: {reason}")
            was = f" (was version {result.previous})" if result.previous else ""
            out(f"@{alias} -> {name} version {version.version}{was}")
            challenger = _alias_version(client, name, CHALLENGER)
            if challenger is not None and challenger.version == version.version:
                client.delete_registered_model_alias(name, CHALLENGER)
        else:
            client.set_registered_model_alias(name, CHALLENGER, version.version)
            client.set_model_version_tag(name, version.version, "phitune.gate", CHALLENGER)
            result.alias, result.previous = CHALLENGER, champion.version
            out(f"gate: {reason}")
            out(f"@{CHALLENGER} -> {name} version {version.version}; @{alias} stays on version {champion.version}")
        return result
