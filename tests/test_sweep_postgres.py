"""Several `python train.py -m` workers on one study, on a real PostgreSQL server (tests/pg.py)
and on Optuna's journal file: no trial run twice, a killed worker's trial re-run, one MLflow
parent run, and a password in the URLs masked in everything the sweep writes."""
from __future__ import annotations

import collections
import itertools
import signal
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from sweep_app.harness import REPO, popen, run

pytestmark = pytest.mark.slow

PY = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
CANARY = "pw-canary-7f3c91d2"  # the role's password: must appear nowhere the sweep writes
STUDY = "pg-study"
_DB_IDS = itertools.count()
# What a lost update or a deadlock between workers would print.
STORAGE_ERRORS = ("could not serialize", "deadlock detected", "database is locked", "UniqueViolation",
                  "duplicate key", "IntegrityError", "OperationalError", "Traceback")


@pytest.fixture
def dbs(pg_server):
    """A fresh Optuna database and MLflow database for one test, owned by a role with a password."""
    n = next(_DB_IDS)
    role = f"phitune{n}"
    pg_server.create_role(role, CANARY)
    for db in (f"optuna{n}", f"mlflow{n}"):
        pg_server.create_database(db, owner=role)
    return {"optuna": pg_server.url(f"optuna{n}", role, CANARY), "mlflow": pg_server.url(f"mlflow{n}", role, CANARY),
            "optuna_db": f"optuna{n}", "mlflow_db": f"mlflow{n}", "server": pg_server}


def _subset(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("\n".join(src.read_text(encoding="utf-8-sig").splitlines()[:n]) + "\n", encoding="utf-8")
    return dst


def worker_cmd(tmp_path: Path, storage: str, tracking: str, n_trials: int, worker: int, *extra: str) -> list[str]:
    """One worker of the quick sweep, with trials of 2 optimizer steps on 16 examples."""
    train = tmp_path / "train.jsonl"
    valid = tmp_path / "valid.jsonl"
    if not train.exists():
        _subset(REPO / "data/support_train.jsonl", train, 16)
        _subset(REPO / "data/support_valid.jsonl", valid, 8)
    return [PY, str(REPO / "train.py"), "-m", "sweep=quick", f"hydra.sweeper.storage={storage}",
            f"tracking.uri={tracking}", f"hydra.sweep.dir={tmp_path}/w{worker}", f"hydra.sweeper.study_name={STUDY}",
            f"data.train_file={train}", f"data.validation_file={valid}", f"hydra.sweeper.n_trials={n_trials}",
            "hydra.sweeper.plots=false", "hydra.sweeper.pruner.name=none", "train.max_steps=2", "train.eval_steps=2",
            "train.progress=false", "train.evaluate_at_end=false", "tracking.log_model=false", *extra]


def start_workers(tmp_path: Path, cmds: list[list[str]]) -> list:
    return [popen(cmd, tmp_path / f"w{i}.log", cwd=tmp_path) for i, cmd in enumerate(cmds)]


def wait_all(procs, tmp_path: Path, timeout: float = 900) -> None:
    # Seconds; ~80 s on an idle 2-core machine, over 400 s at load 8: a hang, not a slow machine, should fail.
    deadline = time.monotonic() + timeout
    for i, p in enumerate(procs):
        rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert rc == 0, f"worker {i} exited {rc}:\n{(tmp_path / f'w{i}.log').read_text()[-4000:]}"


def logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("w*.log")))


def load(storage: str):
    import optuna

    from phitune.sweep.study import open_storage

    return optuna.load_study(study_name=STUDY, storage=open_storage(storage))


def counted_trials(study) -> list:
    from phitune.sweep.study import counted

    return counted(study.get_trials())


def assert_study_complete(study, n_trials: int) -> list:
    trials = study.get_trials()
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    done = counted_trials(study)
    assert len(done) == n_trials and {t.state for t in done} == {TrialState.COMPLETE}
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(params)) == n_trials, f"a parameter set ran twice: {collections.Counter(params).most_common(2)}"
    return done


def mlflow_runs(tracking: str, experiment: str = "phitune"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(experiment)
    all_runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in all_runs if r.data.tags.get("phitune.role") == "sweep"]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


class Watch:
    """The study's trials and the trials' MLflow runs, polled while the workers run."""

    def __init__(self, storage: str, tracking: str):
        from phitune.sweep.study import open_storage

        self.storage, self.tracking, self.client = open_storage(storage), tracking, None

    def trials(self) -> list:
        import optuna

        try:
            return optuna.load_study(study_name=STUDY, storage=self.storage).get_trials()
        except KeyError:  # not created yet
            return []

    def has_running_run(self, number: int) -> bool:
        from mlflow.tracking import MlflowClient

        self.client = self.client or MlflowClient(self.tracking)
        exp = self.client.get_experiment_by_name("phitune")
        return exp is not None and bool(self.client.search_runs(
            [exp.experiment_id], f"tags.`phitune.trial_number` = '{number}' and attributes.status = 'RUNNING'"))


def trial_folders(sweep_dir: Path) -> set[int]:
    return {int(p.name) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()} if sweep_dir.exists() else set()


def test_three_workers_share_one_postgres_study_and_one_parent_run(tmp_path, dbs, tiny_model_dir):
    n = 9
    procs = start_workers(tmp_path, [worker_cmd(tmp_path, dbs["optuna"], dbs["mlflow"], n, i) for i in range(3)])
    wait_all(procs, tmp_path)
    out = logs(tmp_path)
    for bad in STORAGE_ERRORS:
        assert bad not in out, f"{bad!r} in the workers' logs:\n{out[-4000:]}"
    assert "[psycopg][WARNING]" not in out  # the store's handled duplicate-key fallback is not noise in the log
    study = load(dbs["optuna"])
    done = assert_study_complete(study, n)
    ran_by = {i: trial_folders(tmp_path / f"w{i}") for i in range(3)}
    assert sum(len(v) for v in ran_by.values()) == len(set().union(*ran_by.values())) == n  # each trial ran once
    assert sum(bool(v) for v in ran_by.values()) >= 2, f"the trials ran in one worker: {ran_by}"

    parents, children = mlflow_runs(dbs["mlflow"])
    assert len(parents) == 1, "each worker opened its own parent run"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["phitune.trial_number"]) for c in children) == sorted(t.number for t in done)
    assert study.user_attrs["phitune.parent_run_id"] == parents[0].info.run_id

    # The password is in both URLs on the command line: nothing the sweep wrote may hold it.
    assert "***@127.0.0.1" in parents[0].data.params["storage"]
    for db in (dbs["mlflow_db"], dbs["optuna_db"]):
        dump = dbs["server"].dump_text(db)
        assert "runs" in dump or "trials" in dump  # a vacuous scan would pass on an empty dump
        assert CANARY not in dump, f"the password is in database {db}"
    assert "MLflow parent run" in out and CANARY not in out
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".log", ".json", ".txt", ".csv"):
            assert CANARY not in path.read_text(errors="replace"), f"the password is in {path}"


def test_killed_worker_trial_is_failed_by_heartbeat_and_rerun(tmp_path, dbs, tiny_model_dir):
    n = 6
    fast = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=4")
    cmds = [worker_cmd(tmp_path, dbs["optuna"], dbs["mlflow"], n, i, *fast) for i in range(3)]
    procs = start_workers(tmp_path, cmds)
    watch = Watch(dbs["optuna"], dbs["mlflow"])
    victim = killed = None
    try:
        deadline = time.monotonic() + 600
        # The first worker seen inside a trial whose MLflow run has started: mid-trial.
        while killed is None and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), logs(tmp_path)[-4000:]
            running = {t.number for t in watch.trials() if t.state == TrialState.RUNNING}
            for i in range(3):
                inside = sorted(n for n in trial_folders(tmp_path / f"w{i}") & running if watch.has_running_run(n))
                if inside:
                    victim, killed = i, inside[0]
                    procs[i].send_signal(signal.SIGKILL)
                    break
            time.sleep(0.2)
        assert killed is not None, "no worker was seen running a trial"
    finally:
        if victim is None:
            for p in procs:
                p.kill()
        for p in procs:
            if victim is None or p is procs[victim]:
                p.wait()
    others = [i for i in range(3) if i != victim]
    for i in others:
        assert procs[i].wait(timeout=900) == 0, (tmp_path / f"w{i}.log").read_text()[-4000:]

    study = load(dbs["optuna"])
    trials = study.get_trials()
    dead = trials[killed]
    assert dead.state == TrialState.FAIL and dead.user_attrs["error"].startswith("no heartbeat for 4 s")
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == dead.params
    assert_study_complete(study, n)
    out = "\n".join((tmp_path / f"w{i}.log").read_text() for i in others)
    for bad in STORAGE_ERRORS:
        assert bad not in out

    again = run(cmds[others[0]], timeout=600, cwd=tmp_path)  # the study is complete: nothing more to run
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{n}/{n} trials done (resumed)" in again.stdout
    assert len(load(dbs["optuna"]).get_trials()) == len(trials)
    parents, children = mlflow_runs(dbs["mlflow"])
    assert len(parents) == 1 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    orphan = [c for c in children if c.data.tags["phitune.trial_number"] == str(killed)]
    assert [c.info.status for c in orphan] == ["KILLED"]  # the SIGKILLed trial's run, ended by a survivor


def test_two_workers_on_a_journal_file(tmp_path, tiny_model_dir):
    from sweep_app.harness import make_stores

    n = 4
    journal = f"journal://{tmp_path}/shared/study.log"  # tmp_path is absolute: journal:///tmp/...
    tracking = make_stores(tmp_path).mlflow_url
    procs = start_workers(tmp_path, [worker_cmd(tmp_path, journal, tracking, n, i) for i in range(2)])
    wait_all(procs, tmp_path)
    out = logs(tmp_path)
    assert "Traceback" not in out and f"storage {journal}" in out
    assert (tmp_path / "shared/study.log").stat().st_size > 0
    study = load(journal)
    done = assert_study_complete(study, n)
    ran_by = [trial_folders(tmp_path / f"w{i}") for i in range(2)]
    assert len(ran_by[0]) + len(ran_by[1]) == len(ran_by[0] | ran_by[1]) == n
    parents, children = mlflow_runs(tracking)
    assert len(parents) == 1 and len(children) == len(done)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


def test_workers_moving_the_best_mark_at_once_do_not_collide(dbs):
    """Each worker marks the best trial after each of its trials: on PostgreSQL, concurrent
    writes of one tag key race (MLflow's set_tag reads, then inserts), and a worker that
    loses the race must not fail its sweep."""
    import threading
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from phitune.sweep.parent import BEST_RUN_TAG, BEST_TAG, TRIAL_TAG, ParentRun

    client = MlflowClient(dbs["mlflow"])
    exp = client.create_experiment("phitune")
    parent = client.create_run(exp, run_name="sweep").info.run_id
    children = [client.create_run(exp, run_name=f"trial-{i}", tags={"mlflow.parentRunId": parent, TRIAL_TAG: str(i)})
                for i in range(2)]
    errors, start = [], threading.Barrier(6)

    def worker(k: int) -> None:
        pr = ParentRun(SimpleNamespace(uri=dbs["mlflow"]), parent, exp, resumed=False)
        start.wait()
        try:
            for i in range(12):
                best = children[(k + i) % 2]
                pr.mark_best(client.get_run(best.info.run_id), f"trial-{k} ★ best")
        except Exception as err:  # noqa: BLE001 - the race is what the test looks for
            errors.append(repr(err)[:500])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    assert client.get_run(parent).data.tags[BEST_RUN_TAG] in {c.info.run_id for c in children}
    assert any(client.get_run(c.info.run_id).data.tags.get(BEST_TAG) == "true" for c in children)


def test_a_worker_that_loses_the_race_to_create_the_schema_retries(pg_server):
    """Another worker creates (and commits) table `studies` after this worker's existence check
    and before its CREATE TABLE, as when three workers start at once: PostgreSQL answers
    DuplicateTable; open_storage retries and the schema is finished."""
    import optuna
    import psycopg
    from optuna.storages._rdb import models
    from sqlalchemy import event

    from phitune.sweep.study import open_storage

    pg_server.create_database("optuna_race")
    raced = []

    def other_worker_first(*_args, **_kw):
        if not raced:  # once: the retry then finds the table and creates the rest
            raced.append(True)
            with psycopg.connect(f"host=127.0.0.1 port={pg_server.port} user=postgres dbname=optuna_race") as other:
                other.execute("CREATE TABLE studies (study_id SERIAL NOT NULL, study_name VARCHAR(512) NOT NULL, "
                              "PRIMARY KEY (study_id))")

    table = models.StudyModel.__table__
    event.listen(table, "before_create", other_worker_first)
    try:
        storage = open_storage(pg_server.url("optuna_race"))
    finally:
        event.remove(table, "before_create", other_worker_first)
    assert raced == [True]
    study = optuna.create_study(storage=storage, study_name="raced")
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["raced"]
    assert study.ask().number == 0
