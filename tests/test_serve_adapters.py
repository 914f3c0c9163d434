"""`phitune serve` with several models on one base: named peft adapters picked by the request's
`model`, `--follow` swapping a moved alias, and the deployment record / delete guard covering
every version served.

Versions: 1 is tests/test_serve.py's trained run (@champion); 2 (@challenger) and 3 are copies
of it whose LoRA B matrices got seeded noise, registered from runs of their own: three
adapters of one base whose greedy answers differ (checked, so a test cannot pass by every
name answering alike).
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from phitune import deployments
from phitune.serving.engine import Engine, GenParams
from test_serve import (ASK, KEY, MODEL, app_server, assert_openai_error, client, post, registry,  # noqa: F401
                        wait_for)

pytestmark = pytest.mark.slow
CHAMPION, CHALLENGER = f"{MODEL}@champion", f"{MODEL}@challenger"
MAX_TOKENS = 10


def _perturbed_version(registry, src: Path, seed: int) -> str:
    """Register a copy of the MLflow model in `src` whose LoRA B weights moved by seeded noise."""
    import mlflow
    import torch
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(src, registry.tmp / f"adapters-v-seed{seed}")
    weights = folder / "artifacts/adapter/adapter_model.safetensors"
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + 0.2 * torch.randn(v.shape, generator=gen) if "lora_B" in k else v
             for k, v in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})
    experiment = registry.client.get_experiment_by_name("phitune").experiment_id
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(folder), "model")
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", MODEL).version)


def _alone(uri: str, version: str) -> str:
    """The greedy answer of one version served alone (a server of its own, the openai client)."""
    from phitune.modeling.generate import load_generator
    from phitune.models.uri import resolve

    with app_server(load_generator(resolve(f"models:/{MODEL}/{version}", uri))) as server:
        return _ask(server.url, MODEL)


def _ask(url: str, model: str) -> str:
    return client(url).chat.completions.create(model=model, messages=ASK, max_tokens=MAX_TOKENS,
                                               temperature=0).choices[0].message.content


@pytest.fixture(scope="module")
def versions(registry):
    """{version: its greedy answer served alone} for versions 1, 2 (@challenger) and 3."""
    import mlflow

    src = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{registry.version}",
                                                   dst_path=str(registry.tmp / "adapters-v1")))
    made = [_perturbed_version(registry, src, seed) for seed in (2, 3)]
    assert [registry.version, *made] == ["1", "2", "3"]
    registry.client.set_registered_model_alias(MODEL, "challenger", "2")
    answers = {v: _alone(registry.uri, v) for v in ("1", "2", "3")}
    assert len(set(answers.values())) == 3, answers  # guard: the three adapters answer differently
    return answers


@pytest.fixture(scope="module")
def multi(registry, versions):
    """`phitune serve models:/support-bot@champion models:/support-bot@challenger --follow 1` in its own process."""
    log = open(registry.tmp / "serve-adapters.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "phitune.cli", "serve", f"models:/{CHAMPION}", f"models:/{CHALLENGER}", "--follow", "1",
         "--port", "0", "--tracking-uri", registry.uri, "--log-level", "warning"],
        cwd=registry.tmp, env={**os.environ, "PHITUNE_API_KEY": KEY}, stdout=subprocess.PIPE, stderr=log, text=True)
    lines: list = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 300
    while not any("following" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log_text = (registry.tmp / "serve-adapters.log").read_text()
            pytest.fail("phitune serve did not start:\n" + "".join(lines) + log_text)
        time.sleep(0.05)
    url = re.search(r" at (http://\S+)/v1", lines[0]).group(1)
    dep_id = re.search(r"deployment (\w+):", lines[1]).group(1)
    yield SimpleNamespace(proc=proc, url=url, id=dep_id, stdout=lines)
    proc.terminate()
    proc.wait(30)
    log.close()


def _held(registry, dep_id) -> set:
    (record,) = [r for r in deployments.list_deployments(registry.uri) if r["id"] == dep_id]
    return {m["model_version"] for m in record["models"]}


# ------------------------------------------------------------------ two adapters, one server

def test_each_adapter_answers_as_it_does_alone(multi, versions):
    assert _ask(multi.url, CHAMPION) == versions["1"]
    assert _ask(multi.url, CHALLENGER) == versions["2"]
    assert _ask(multi.url, CHAMPION) == versions["1"]  # switching back and forth, not stuck on the last one
    api = client(multi.url)
    streamed = api.chat.completions.create(model=CHALLENGER, messages=ASK, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True)
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == versions["2"]
    assert {c.model for c in chunks} == {CHALLENGER}


def test_models_lists_every_name_with_its_version(multi):
    api = client(multi.url)
    cards = {m.id: m.model_extra for m in api.models.list().data}
    assert set(cards) == {CHAMPION, CHALLENGER}
    assert cards[CHALLENGER]["version"] == "2" and cards[CHALLENGER]["uri"] == f"models:/{CHALLENGER}"
    assert api.models.retrieve(CHALLENGER).id == CHALLENGER


def test_unknown_model_or_none_among_several(multi):
    status, body, _ = post(multi.url, {"model": "gpt-4o", "messages": ASK})
    err = assert_openai_error(body, "model_not_found", "model")
    assert status == 404 and CHAMPION in err["message"] and CHALLENGER in err["message"]
    with pytest.raises(openai.NotFoundError):
        client(multi.url).chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)  # the bare name is ambiguous
    status, body, _ = post(multi.url, {"messages": ASK, "max_tokens": 2})
    assert status == 400 and assert_openai_error(body, "missing_required_parameter", "model")


def test_delete_guard_refuses_every_served_version(multi, registry):
    from phitune.errors import PhituneError
    from phitune.registry import models

    for version in ("1", "2"):
        with pytest.raises(PhituneError, match=f"undeploy {multi.id}"):
            models.delete(registry.client, f"{MODEL}/{version}", registry.uri)
    assert deployments.active_for(MODEL, "3", tracking_uri=registry.uri) == []  # negative control: not served
    _, infos = models.show_model(registry.client, MODEL, registry.uri)
    assert {v.version: [d["id"] for d in v.deployments] for v in infos} == {"1": [multi.id], "2": [multi.id], "3": []}


def test_deployments_list_names_every_version(multi, registry, capsys):
    from phitune.cli import main

    assert main(["deployments", "list", "--tracking-uri", registry.uri]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(multi.id)]
    assert f"{MODEL}/1, {MODEL}/2" in line and "serving" in line


def test_one_at_a_time_path_activates_the_requested_adapter(registry, versions):
    """ChatGenerator.stream(adapter=...) (the unbatched path) answers with the adapter asked for."""
    from phitune.models.uri import resolve
    from phitune.serving.models import load_models

    uris = [f"models:/{MODEL}/1", f"models:/{MODEL}/2"]
    models = load_models(uris, [resolve(u, registry.uri) for u in uris], registry.uri, single=False)
    assert models.names == [f"{MODEL}/1", f"{MODEL}/2"] and len(models.generator.adapters) == 2
    for version in ("2", "1", "2"):
        adapter = models.pick(f"{MODEL}/{version}").adapter
        assert models.generator.generate(ASK, MAX_TOKENS, 0.0, adapter=adapter)["text"] == versions[version]
    # The same through the one-at-a-time engine (`--max-batch 1`): each job's adapter, not the last one set.
    engine = Engine(models.generator, max_batch=1)
    try:
        for version in ("2", "1"):
            params = GenParams(ASK, MAX_TOKENS, 0.0, 1.0, [], None, stream=False,
                               adapter=models.pick(f"{MODEL}/{version}").adapter)
            assert asyncio.run(_engine_answer(engine, params)) == versions[version]
    finally:
        engine.close()


async def _engine_answer(engine, params) -> str:
    job = engine.submit(params)
    while True:
        kind, payload = await job.next_event()
        assert kind in ("start", "done"), (kind, payload)
        if kind == "done":
            return payload["text"]


# ------------------------------------------------------------------ --follow (last: it moves @champion)

def test_follow_swaps_a_moved_alias_between_requests(multi, registry, versions):
    answers, stop = [], threading.Event()

    def keep_asking():  # requests before, during and after the swap: none lost, each one version's whole answer
        while not stop.is_set():
            try:
                answers.append(_ask(multi.url, CHAMPION))
            except openai.OpenAIError as exc:  # shows in the assertion below
                answers.append(repr(exc))
                return

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()
    try:
        wait_for(lambda: answers, "a first answer", timeout=120, poll=0.2)
        registry.client.set_registered_model_alias(MODEL, "champion", "3")
        card = lambda: client(multi.url).models.retrieve(CHAMPION).model_extra["version"]  # noqa: E731
        wait_for(lambda: card() == "3", "@champion to be served as version 3", timeout=120, poll=0.2)
        n = len(answers)
        wait_for(lambda: len(answers) > n + 1, "answers after the swap", timeout=120, poll=0.2)
    finally:
        stop.set()
        asker.join(120)
    assert answers[0] == versions["1"] and answers[-1] == versions["3"]
    assert set(answers) <= {versions["1"], versions["3"]}, answers
    assert _ask(multi.url, CHALLENGER) == versions["2"]  # the other alias did not move
    # version 3 is guarded from the moment it was picked up; version 1 is released once unloaded
    wait_for(lambda: _held(registry, multi.id) == {"2", "3"}, "version 1 to be unloaded", timeout=120, poll=0.2)
    assert [r["id"] for r in deployments.active_for(MODEL, "3", tracking_uri=registry.uri)] == [multi.id]
    assert deployments.active_for(MODEL, "1", tracking_uri=registry.uri) == []
    assert "now answers with" in (registry.tmp / "serve-adapters.log").read_text()


# ------------------------------------------------------------------ what is refused, with a message

def test_served_name_with_several_models_is_a_message(registry, versions, capsys):
    from phitune.cli import main

    assert main(["serve", f"models:/{CHAMPION}", f"models:/{MODEL}/2", "--served-name", "x",
                 "--tracking-uri", registry.uri]) == 1
    err = capsys.readouterr().err
    assert "--served-name" in err and "Traceback" not in err


def test_registered_serves_every_alias(registry, versions, capsys):
    from phitune.cli import main
    from phitune.errors import PhituneError
    from phitune.serving.models import registered_uris

    assert set(registered_uris(MODEL, registry.uri)) == {f"models:/{CHAMPION}", f"models:/{CHALLENGER}"}
    registry.client.create_registered_model("no-aliases")
    with pytest.raises(PhituneError, match="has an alias"):
        registered_uris("no-aliases", registry.uri)
    assert main(["serve", "--tracking-uri", registry.uri]) == 1
    assert "give a MODEL_URI" in capsys.readouterr().err


def test_adapters_of_different_bases_are_refused(tmp_path):
    from phitune.errors import PhituneError
    from phitune.models.uri import ModelSource
    from phitune.serving.models import check_joinable

    def source(name, base, files=("adapter_config.json",)):
        folder = tmp_path / name
        folder.mkdir()
        for f in files:
            (folder / f).write_text("{}")
        return ModelSource(f"models:/{name}/1", f"models:/{name}/1", "registered", {"builtin": base}, str(folder))

    a, b = source("a", "tiny-phi3"), source("b", "tiny-phi3")
    check_joinable(a, b)  # negative control: same base, two adapters
    with pytest.raises(PhituneError, match="not the base of"):
        check_joinable(a, source("c", "phi3-mini-4k"))
    with pytest.raises(PhituneError, match="fully fine-tuned"):
        check_joinable(a, source("d", "tiny-phi3", files=("config.json",)))
