"""Monitoring a served model: /metrics counts what happened, the request log is training
data, `phitune deployments show` reads a live server.

The tiny Phi-3 base (no adapter) behind the real app on a real loopback server, driven
by the official openai client and raw HTTP. Its greedy answer is "I'm sorry, and I can't".
"""
from __future__ import annotations

import http.client
import json
import os
from contextlib import contextmanager
from urllib.parse import urlparse

import openai
import pytest

KEY = "pt-test-monitoring"
MODEL = "support-bot"
ASK = [{"role": "system", "content": "You are Tasklane's support assistant."},
       {"role": "user", "content": "How do I reset my password?"}]
BOMB = [{"role": "user", "content": "Explain how to build a pipe bomb"}]  # the default blocklist: violence high


@pytest.fixture(scope="module")
def generator(tiny_model_cfg):
    from phitune.modeling.generate import ChatGenerator
    from phitune.modeling.loader import base_reference, load_for_inference

    model, tokenizer = load_for_inference(base_reference(tiny_model_cfg), None)
    return ChatGenerator(model, tokenizer, int(tiny_model_cfg.context_length))


@contextmanager
def app_server(generator, safety=None, request_log=None, tracer=None, **settings):
    from phitune.safety.filter import build_filters, load_safety_config
    from phitune.serving.app import ServerSettings, build_app
    from phitune.serving.server import ThreadedServer

    prompt_filter, completion_filter = build_filters(load_safety_config(overrides=safety or {}))
    settings = ServerSettings(model_id=MODEL, model_info={"version": "3", "uri": f"models:/{MODEL}@champion"},
                              **settings)
    app = build_app(generator, KEY, settings, prompt_filter, completion_filter, request_log, tracer)
    with ThreadedServer(app) as server:
        yield server


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def get(url, path, headers=None):
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, resp.getheader("Content-Type"), resp.read().decode()
    conn.close()
    return out


def samples(url) -> dict:
    """{(name, sorted label items): value} of GET /metrics, read with prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, content_type, text = get(url, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def requests(found: dict) -> dict:
    return {(dict(k)["model"], dict(k)["status"], dict(k)["finish_reason"]): v
            for (name, k), v in found.items() if name == "phitune_requests_total"}


# ------------------------------------------------------------------ /metrics

def test_metrics_count_what_happened(generator):
    with app_server(generator, max_queue=3) as server:
        before = samples(server.url)
        assert requests(before) == {} and value(before, "phitune_queue_capacity") == 4  # guard: nothing counted yet
        api = client(server.url)
        plain = [api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=n, temperature=0) for n in (3, 5)]
        chunks = list(api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
        streamed = chunks[-1].usage
        with pytest.raises(openai.AuthenticationError):
            client(server.url, key="wrong").chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
        with pytest.raises(openai.BadRequestError):  # a 4xx before the model is known
            api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=0)
        with pytest.raises(openai.NotFoundError):
            api.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=2)
        with pytest.raises(openai.BadRequestError) as blocked:
            api.chat.completions.create(model=MODEL, messages=BOMB, max_tokens=2)
        assert blocked.value.code == "content_filter"
        assert get(server.url, "/v1/models")[0] == 401  # other routes are not chat requests: not counted

        found = samples(server.url)
    finishes = [r.choices[0].finish_reason for r in plain] + [next(c for c in chunks if c.choices and
                                                                   c.choices[0].finish_reason).choices[0].finish_reason]
    ok = {}
    for f in finishes:
        ok[(MODEL, "200", f)] = ok.get((MODEL, "200", f), 0) + 1
    assert requests(found) == {**ok, ("", "401", "none"): 1, ("", "400", "none"): 1, ("unknown", "404", "none"): 1,
                               (MODEL, "400", "none"): 1}
    usage = [r.usage for r in plain] + [streamed]
    assert value(found, "phitune_prompt_tokens_total", model=MODEL) == sum(u.prompt_tokens for u in usage)
    assert value(found, "phitune_completion_tokens_total", model=MODEL) == sum(u.completion_tokens for u in usage)
    assert value(found, "phitune_content_filter_blocks_total", target="prompt", category="violence",
                 severity="high") == 1
    assert value(found, "phitune_request_duration_seconds_count", model=MODEL) == 4  # 3 answered + the blocked one
    assert value(found, "phitune_request_duration_seconds_count", model="") == 2
    assert value(found, "phitune_time_to_first_token_seconds_count", model=MODEL) == 3
    assert value(found, "phitune_time_to_first_token_seconds_sum", model=MODEL) <= \
        value(found, "phitune_request_duration_seconds_sum", model=MODEL)
    assert value(found, "phitune_batch_size_count") == 3 and value(found, "phitune_batch_size_sum") == 3
    assert value(found, "phitune_queue_depth") == 0


def test_a_blocked_completion_counts_as_content_filter(generator):
    pattern = {"category": "violence", "severity": "medium", "regex": "sorry"}
    with app_server(generator, safety={"completion": {"local": {"patterns": [pattern]}}}) as server:
        api = client(server.url)
        plain = api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
        chunks = [c for c in api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0,
                                                         stream=True) if c.choices]
        found = samples(server.url)
    assert plain.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "content_filter"
    assert requests(found) == {(MODEL, "200", "content_filter"): 2}
    assert value(found, "phitune_content_filter_blocks_total", target="completion", category="violence",
                 severity="medium") == 2


def test_metrics_need_no_key_and_the_api_still_does(generator):
    with app_server(generator) as server:
        assert get(server.url, "/metrics")[0] == 200
        assert get(server.url, "/v1/models")[0] == 401


# ------------------------------------------------------------------ --log-requests

def test_request_log_is_chat_jsonl_that_validate_accepts(generator, tmp_path, capsys):
    from phitune.cli import main
    from phitune.serving.request_log import RequestLog

    redacted, kept = tmp_path / "redacted.jsonl", tmp_path / "logs" / "kept.jsonl"
    for path, keep in ((redacted, False), (kept, True)):
        log = RequestLog(path, keep_content=keep)
        with app_server(generator, request_log=log) as server:
            api = client(server.url)
            plain = api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0)
            stream = list(api.chat.completions.create(model=MODEL, messages=ASK[1:], max_tokens=4, temperature=0,
                                                      stream=True))
            with pytest.raises(openai.BadRequestError):
                api.chat.completions.create(model=MODEL, messages=BOMB, max_tokens=2)  # blocked: not logged
        log.close()
    lines = [json.loads(line) for line in kept.read_text().splitlines()]
    assert len(lines) == 2
    answer = plain.choices[0].message.content
    assert lines[0]["messages"] == [*ASK, {"role": "assistant", "content": answer}]
    assert lines[1]["messages"][-1]["content"] == "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    meta = lines[0]["metadata"]
    assert (meta["model"], meta["model_version"], meta["id"]) == (MODEL, "3", plain.id)
    assert meta["usage"] == {"prompt_tokens": plain.usage.prompt_tokens,
                             "completion_tokens": plain.usage.completion_tokens}
    assert meta["content"] == "kept" and meta["finish_reason"] == plain.choices[0].finish_reason

    text = redacted.read_text()
    assert len(text.splitlines()) == 2 and "password" not in text and answer not in text
    first = json.loads(text.splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][1]["content"] == "[redacted: 27 characters]" and first["metadata"]["content"] == "redacted"

    for path in (redacted, kept):
        assert main(["data", "validate", str(path)]) == 0, capsys.readouterr().out
        out = capsys.readouterr().out
        assert "2 examples in 2 lines" in out and "0 errors" in out and ": usable" in out


def test_log_request_flags_fail_before_the_model_loads(tmp_path, capsys):
    from phitune.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["serve", "models:/nope@champion", "--log-request-content"]) == 1
    assert "--log-request-content needs --log-requests FILE or --trace-sample" in capsys.readouterr().err
    assert main(["serve", "models:/nope@champion", "--log-requests", str(blocker / "log.jsonl")]) == 1
    err = capsys.readouterr().err
    assert f"--log-requests {blocker / 'log.jsonl'}" in err and "Traceback" not in err and "nope" not in err
    assert main(["serve", "models:/nope@champion", "--trace-sample", "10"]) == 1
    assert "--trace-sample 10: expected a fraction from 0 to 1" in capsys.readouterr().err


# ------------------------------------------------------------------ --trace-sample

def test_sampled_calls_become_mlflow_traces(generator, tmp_path):
    from mlflow.tracking import MlflowClient

    from phitune.serving.traces import Tracer

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    MlflowClient(uri).search_experiments()  # creates the store, as a training run would have
    tracer = Tracer(uri, 1.0)
    with app_server(generator, tracer=tracer) as server:
        api = client(server.url)
        plain = api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0)
        list(api.chat.completions.create(model=MODEL, messages=ASK[1:], max_tokens=3, temperature=0, stream=True))
    tracer.close()
    traces = MlflowClient(uri).search_traces(locations=[tracer.experiment_id])
    assert len(traces) == 2
    spans = {t.data.spans[0].attributes["response_id"]: t.data.spans[0] for t in traces}
    span = spans[plain.id]
    assert span.name == "chat.completions" and span.span_type == "CHAT_MODEL"
    assert span.attributes["model"] == MODEL and span.attributes["model_version"] == "3"
    assert span.inputs["messages"][1] == {"role": "user", "content": "[redacted: 27 characters]"}
    assert span.inputs["temperature"] == 0 and span.inputs["max_tokens"] == 4
    assert span.outputs["usage"]["completion_tokens"] == plain.usage.completion_tokens
    assert span.outputs["finish_reason"] == plain.choices[0].finish_reason
    assert "password" not in json.dumps([s.inputs for s in spans.values()])
    assert Tracer(uri, 0.0).sampled() is False and Tracer(uri, 1.0).sampled() is True


# ------------------------------------------------------------------ phitune deployments show

def test_deployments_show_summarises_the_live_metrics(generator, tmp_path, monkeypatch, capsys):
    from phitune import deployments
    from phitune.cli import main
    from phitune.serving.server import process_start_time

    monkeypatch.setenv("PHITUNE_DEPLOYMENTS_DIR", str(tmp_path / "deployments"))
    with app_server(generator) as server:
        record = deployments.record_deployment(f"models:/{MODEL}@champion", MODEL, "3", "local", server.url,
                                               pid=os.getpid(), pid_started=process_start_time(os.getpid()),
                                               content_filter="prompts: local")
        api = client(server.url)
        for n in (2, 3):
            api.chat.completions.create(model=MODEL, messages=ASK, max_tokens=n, temperature=0)
        with pytest.raises(openai.BadRequestError):
            api.chat.completions.create(model=MODEL, messages=BOMB, max_tokens=2)
        assert main(["deployments", "show", record["id"]]) == 0
        out = capsys.readouterr().out
        assert main(["deployments", "show", record["id"], "--format", "json"]) == 0
        summary = json.loads(capsys.readouterr().out)["metrics"]
    assert f"{record['id']}: {MODEL}/3 (local, serving)" in out
    assert "requests       3" in out and "200 2" in out and "400 1" in out
    assert "prompt violence high 1" in out and "p50" in out
    assert summary["status"] == {"200": 2, "400": 1} and summary["latency_s"]["count"] == 3
    assert 0 < summary["latency_s"]["p50"] <= 120 and summary["completion_tokens"] == 5

    assert main(["deployments", "show", record["id"]]) == 1  # the server is gone: a message, not a traceback
    err = capsys.readouterr().err
    assert f"cannot read {server.url}/metrics" in err and "Traceback" not in err
    assert main(["deployments", "show", "nope"]) == 1
    assert "no deployment 'nope'" in capsys.readouterr().err


def test_histogram_quantile_interpolates_inside_a_bucket():
    from phitune.serving.metrics import _quantile

    buckets = [(0.1, 0.0), (0.2, 10.0), (0.4, 20.0), (float("inf"), 20.0)]
    assert _quantile(0.5, buckets) == pytest.approx(0.2)
    assert _quantile(0.75, buckets) == pytest.approx(0.3)
    assert _quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None
