"""The content filter: severities and thresholds, the local backend's lists and patterns,
the Azure AI Content Safety backend against a loopback stand-in of its REST API, and
the screening of training data (`phitune data validate --safety`, data.safety_check)."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from phitune.errors import DataError, PhituneError
from phitune.safety.filter import (CATEGORIES, ContentFilter, StreamScreen, build_filter, build_filters,
                                   load_safety_config, severity_from_value)

REPO = Path(__file__).resolve().parents[1]
AZURE_KEY = "cs-key-9d1f0c77e2a4-never-log-me"


# ------------------------------------------------------------ Azure stand-in

class AzureContentSafetyStandIn:
    """A loopback HTTP server implementing `POST /contentsafety/text:analyze` as Azure does:
    key in Ocp-Apim-Subscription-Key, api-version in the query, FourSeverityLevels output.

    `rules` maps a lower-case word to (Azure category, severity 0/2/4/6); `fail_with`
    makes every call answer that HTTP status with Azure's error body."""

    def __init__(self, key: str = AZURE_KEY):
        self.key = key
        self.rules: dict = {}
        self.fail_with: int | None = None
        self.requests: list = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                url = urlparse(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stand_in.requests.append({"path": url.path, "query": parse_qs(url.query), "headers": dict(self.headers),
                                          "body": raw})
                if url.path != "/contentsafety/text:analyze":
                    return self._send(404, {"error": {"code": "NotFound", "message": "Resource not found"}})
                if self.headers.get("Ocp-Apim-Subscription-Key") != stand_in.key:
                    return self._send(401, {"error": {"code": "401", "message": "Access denied due to invalid "
                                                      "subscription key or wrong API endpoint."}})
                if parse_qs(url.query).get("api-version") != ["2024-09-01"]:
                    return self._send(404, {"error": {"code": "UnsupportedApiVersion", "message": "bad api-version"}})
                if stand_in.fail_with:
                    return self._send(stand_in.fail_with, {"error": {"code": "InternalServerError", "message": "boom"}})
                try:
                    body = json.loads(raw)
                    text = body["text"]
                except (ValueError, KeyError):
                    return self._send(400, {"error": {"code": "InvalidRequestBody", "message": "bad body"}})
                if not text or len(text) > 10_000:
                    return self._send(400, {"error": {"code": "InvalidRequestBody", "message": "text length"}})
                severity = {c: 0 for c in ("Hate", "Sexual", "Violence", "SelfHarm")}
                for word, (cat, sev) in stand_in.rules.items():
                    if word in text.lower():
                        severity[cat] = max(severity[cat], sev)
                cats = body.get("categories") or list(severity)
                self._send(200, {"blocklistsMatch": [],
                                 "categoriesAnalysis": [{"category": c, "severity": severity[c]} for c in cats]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def azure_stand_in(monkeypatch):
    with AzureContentSafetyStandIn() as stand_in:
        monkeypatch.setenv("AZURE_CONTENT_SAFETY_ENDPOINT", stand_in.endpoint)
        monkeypatch.setenv("AZURE_CONTENT_SAFETY_KEY", AZURE_KEY)
        yield stand_in


# ------------------------------------------------------------ the model

def test_azure_severity_scale_maps_to_four_levels():
    assert [severity_from_value(v) for v in (0, 2, 4, 6)] == ["safe", "low", "medium", "high"]
    assert [severity_from_value(v) for v in (1, 3, 5, 7)] == ["safe", "low", "medium", "high"]  # EightSeverityLevels


def test_default_filter_blocks_harm_and_leaves_support_talk_alone():
    prompt_filter, completion_filter = build_filters()
    assert prompt_filter.backend_name == completion_filter.backend_name == "local"
    blocked = {
        "How do I build a pipe bomb?": ("violence", "high"),
        "how can I poison my neighbour": ("violence", "high"),
        "I want to kill myself": ("self_harm", "medium"),
        "all immigrants are vermin": ("hate", "medium"),
        "send nudes": ("sexual", "medium"),
    }
    for text, flag in blocked.items():
        result = prompt_filter.check(text)
        assert result.filtered and flag in result.flagged(), text
    for text in ("How do I kill the process that hangs my export?", "Shoot me an email when it's done",
                 "Execute the script, then attack the backlog", "This skill needs practice", "a murder mystery novel"):
        result = prompt_filter.check(text)
        assert not result.filtered, (text, result.severities)
    low = prompt_filter.check("a murder mystery novel")
    assert low.severities["violence"] == "low"  # reported, under the medium threshold


def test_results_have_azure_shape():
    result = build_filter().check("I want to kill myself")
    out = result.to_azure()
    assert set(out) == set(CATEGORIES)
    assert out["self_harm"] == {"filtered": True, "severity": "medium"}
    assert out["hate"] == {"filtered": False, "severity": "safe"}


def test_thresholds_per_category_and_per_direction():
    config = load_safety_config(overrides={"block_at": "high", "thresholds": {"self_harm": "low", "sexual": "off"},
                                           "completion": {"thresholds": {"violence": "medium"}}})
    prompt_filter, completion_filter = build_filters(config)
    assert not prompt_filter.check("kill them").filtered  # violence medium < high
    assert completion_filter.check("kill them").flagged() == [("violence", "medium")]
    assert prompt_filter.check("thoughts of suicide").flagged() == [("self_harm", "low")]
    assert not prompt_filter.check("child porn").filtered  # sexual: off


def test_configured_blocklists_and_patterns(tmp_path):
    cfg = tmp_path / "safety.yaml"
    cfg.write_text("local:\n"
                   "  defaults: false\n"
                   "  blocklists: {hate: {high: [frobnicate the gizmo]}}\n"
                   "  patterns: [{category: violence, severity: medium, regex: '\\bzap+\\b'}]\n"
                   "prompt:\n"
                   "  local: {blocklists: {sexual: {medium: [wibble]}}}\n")
    prompt_filter, completion_filter = build_filters(load_safety_config(cfg))
    assert prompt_filter.check("please FROBNICATE   the\ngizmo").flagged() == [("hate", "high")]  # case, whitespace
    assert not prompt_filter.check("frobnicate the gizmos").filtered  # whole words
    assert completion_filter.check("zappp").flagged() == [("violence", "medium")]
    assert prompt_filter.check("wibble").filtered and not completion_filter.check("wibble").filtered
    assert not prompt_filter.check("How do I build a pipe bomb?").filtered  # defaults: false


def test_zero_width_characters_do_not_hide_a_term():
    assert build_filter().check("pipe\u200b bomb").filtered
    assert build_filter().check("ｐｉｐｅ ｂｏｍｂ").filtered  # full-width letters (NFKC)


@pytest.mark.parametrize("overrides, message", [
    ({"backend": "bogus"}, "backend"),
    ({"block_at": "extreme"}, "threshold"),
    ({"thresholds": {"violance": "high"}}, "unknown category"),
    ({"local": {"patterns": [{"category": "violence", "severity": "high", "regex": "("}]}}, "bad regex"),
    ({"local": {"blocklists": {"violence": {"severe": ["x"]}}}}, "severity"),
    ({"colour": "red"}, "unknown key"),
    ({"prompt": {"treshold": 1}}, "unknown key"),
])
def test_bad_config_fails_with_a_message(overrides, message):
    with pytest.raises(PhituneError, match=message):
        load_safety_config(overrides=overrides)


def test_bad_yaml_file_fails_with_a_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backend: [local\n")
    with pytest.raises(PhituneError, match="not valid YAML"):
        load_safety_config(bad)
    with pytest.raises(PhituneError, match="cannot read"):
        load_safety_config(tmp_path / "missing.yaml")


def test_shipped_presets_load_by_name_and_path():
    from phitune.safety.filter import PRESETS

    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert names == ["default", "strict"]
    for name in names:
        assert load_safety_config(name) == load_safety_config(PRESETS / f"{name}.yaml")
        build_filters(load_safety_config(name))
    assert load_safety_config("strict")["block_at"] == "low"
    with pytest.raises(PhituneError, match="not a file, nor a preset \\(default, strict\\)"):
        load_safety_config("stricter")


def test_stream_screen_stops_before_the_offending_words_go_out():
    completion_filter = build_filter({"local": {"defaults": False, "blocklists": {"violence": {"high": ["pipe bomb"]}}}},
                                     "completion")
    screen = StreamScreen(completion_filter)
    sent = []
    for delta in ["Here ", "is ", "how ", "to ", "build ", "a ", "pi", "pe ", "bo", "mb ", "at ", "home"]:
        out, verdict = screen.feed(delta)
        sent.append(out)
        if verdict is not None:
            break
    assert screen.blocked and verdict.flagged() == [("violence", "high")]
    assert "pipe" in "".join(sent) and "bomb" not in "".join(sent)
    assert screen.result.to_azure()["violence"] == {"filtered": True, "severity": "high"}

    clean = StreamScreen(completion_filter)
    text = "".join(clean.feed(d)[0] for d in ["Open ", "the ", "board ", "menu"]) + clean.finish()[0]
    assert text == "Open the board menu" and not clean.blocked


# ------------------------------------------------------------ Azure backend

def test_azure_backend_maps_categories_and_severities(azure_stand_in):
    azure_stand_in.rules = {"grr": ("Hate", 4), "ouch": ("Violence", 2), "yikes": ("SelfHarm", 6)}
    content_filter = build_filter({"backend": "azure"}, "prompt")
    result = content_filter.check("grr and ouch and yikes")
    assert result.severities == {"hate": "medium", "sexual": "safe", "violence": "low", "self_harm": "high"}
    assert result.flagged() == [("hate", "medium"), ("self_harm", "high")]
    assert not content_filter.check("hello there").filtered
    req = azure_stand_in.requests[0]
    assert req["path"] == "/contentsafety/text:analyze" and req["query"]["api-version"] == ["2024-09-01"]
    assert req["headers"]["Ocp-Apim-Subscription-Key"] == AZURE_KEY
    body = json.loads(req["body"])
    assert body["outputType"] == "FourSeverityLevels"
    assert set(body["categories"]) == {"Hate", "Sexual", "Violence", "SelfHarm"}


def test_azure_backend_splits_long_text(azure_stand_in):
    azure_stand_in.rules = {"yikes": ("SelfHarm", 6)}
    result = build_filter({"backend": "azure"}, "prompt").check("a" * 10_000 + " yikes")
    assert len(azure_stand_in.requests) == 2 and result.severities["self_harm"] == "high"
    assert build_filter({"backend": "azure"}, "prompt").check("   ").severities["self_harm"] == "safe"
    assert len(azure_stand_in.requests) == 2  # blank text is not sent


def test_azure_errors_never_show_the_key(azure_stand_in, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AZURE_CONTENT_SAFETY_KEY", "wrong-" + AZURE_KEY)
    content_filter = build_filter({"backend": "azure"}, "prompt")
    assert AZURE_KEY not in repr(content_filter)
    result = content_filter.check("hello")
    assert result.blocked_by_error and result.filtered  # fail closed by default
    assert "HTTP 401" in result.error and "Access denied" in result.error
    assert AZURE_KEY not in result.error and AZURE_KEY not in json.dumps(result.to_azure())
    assert AZURE_KEY not in caplog.text

    allow = build_filter({"backend": "azure", "on_error": "allow"}, "prompt").check("hello")
    assert not allow.filtered and allow.to_azure()["error"]["code"] == "content_filter_error"


def test_azure_server_errors_and_unreachable_endpoint(azure_stand_in, monkeypatch):
    azure_stand_in.fail_with = 500
    result = build_filter({"backend": "azure"}, "prompt").check("hello")
    assert result.blocked_by_error and "HTTP 500" in result.error
    assert len(azure_stand_in.requests) == 2  # one retry
    monkeypatch.setenv("AZURE_CONTENT_SAFETY_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    result = build_filter({"backend": "azure", "azure": {"timeout_s": 2}}, "prompt").check("hello")
    assert result.blocked_by_error and "cannot reach" in result.error


def test_azure_needs_endpoint_and_key(monkeypatch):
    monkeypatch.delenv("AZURE_CONTENT_SAFETY_ENDPOINT", raising=False)
    monkeypatch.delenv("AZURE_CONTENT_SAFETY_KEY", raising=False)
    with pytest.raises(PhituneError, match="AZURE_CONTENT_SAFETY_ENDPOINT"):
        build_filter({"backend": "azure"})
    monkeypatch.setenv("AZURE_CONTENT_SAFETY_ENDPOINT", "https://example.cognitiveservices.azure.com")
    with pytest.raises(PhituneError, match="AZURE_CONTENT_SAFETY_KEY"):
        build_filter({"backend": "azure"})


def test_filter_off():
    content_filter = build_filter({"backend": "off"})
    result = content_filter.check("How do I build a pipe bomb?")
    assert not result.filtered and result.to_azure() == {} and not content_filter.enabled
    assert not build_filter({"prompt": {"enabled": False}}, "prompt").enabled
    assert build_filter({"prompt": {"enabled": False}}, "completion").enabled
    assert isinstance(build_filter(), ContentFilter)


# ------------------------------------------------------------ training data

FLAGGED = [
    {"messages": [{"role": "user", "content": "How do I export my board?"},
                  {"role": "assistant", "content": "Open the board menu and choose Export."}]},
    {"messages": [{"role": "user", "content": "How do I build a pipe bomb?"},
                  {"role": "assistant", "content": "I can't help with that."}]},
    {"messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "I want to kill myself"},
                  {"role": "assistant", "content": "all immigrants are vermin"}]},
]


def _write(path: Path, examples) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def test_data_validate_safety_lists_flagged_examples(tmp_path, capsys):
    from phitune.cli import main

    data = _write(tmp_path / "train.jsonl", FLAGGED)
    assert main(["data", "validate", str(data), "--no-tokens", "--safety"]) == 1
    out = capsys.readouterr().out
    assert f"{data}:2: violence high" in out.splitlines()
    assert f"{data}:3: hate medium" in out.splitlines() and f"{data}:3: self_harm medium" in out.splitlines()
    assert f"{data}:1:" not in out.replace(f"{data}:1: warning", "")

    assert main(["data", "validate", str(data), "--no-tokens"]) == 0  # without --safety: usable
    capsys.readouterr()
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("block_at: high\n")
    assert main(["data", "validate", str(data), "--no-tokens", "--safety", "--safety-config", str(lenient)]) == 1
    out = capsys.readouterr().out
    assert f"{data}:2: violence high" in out and f"{data}:3:" not in out


def test_data_validate_safety_passes_the_sample_data(capsys):
    from phitune.cli import main

    for name in ("support_train.jsonl", "support_valid.jsonl"):
        assert main(["data", "validate", str(REPO / "data" / name), "--no-tokens", "--safety", "-q"]) == 0
    assert "flagged" not in capsys.readouterr().out


def test_data_validate_safety_bad_config_is_a_usage_error(tmp_path, capsys):
    from phitune.cli import main

    data = _write(tmp_path / "train.jsonl", FLAGGED[:1])
    bad = tmp_path / "bad.yaml"
    bad.write_text("backend: nope\n")
    assert main(["data", "validate", str(data), "--no-tokens", "--safety", "--safety-config", str(bad)]) == 2
    assert "backend" in capsys.readouterr().err


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    import phitune.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_training_run_refuses_flagged_data_unless_allowed(tmp_path, capsys):
    from phitune.data.dataset import prepare_splits
    from phitune.recipe import run
    from phitune.safety.screen import screen_examples

    clean = [FLAGGED[0]["messages"]] * 11
    train = _write(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}, *m[1:]]}
                                                for i, m in enumerate(clean)] + FLAGGED[1:])
    valid = _write(tmp_path / "valid.jsonl", FLAGGED[:1])
    overrides = [f"data.train_file={train}", f"data.validation_file={valid}", "data.safety_check=true",
                 f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", f"train.output_dir={tmp_path}/ckpt",
                 "train.progress=false", "train.evaluate_at_end=false"]
    with pytest.raises(DataError) as info:
        run(_compose(overrides))
    message = str(info.value)
    assert f"{train}:12: violence high" in message and f"{train}:13: self_harm medium" in message
    assert "data.allow_flagged=true" in message
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "mlruns").exists()  # stopped before any compute

    cfg = _compose(overrides + ["data.allow_flagged=true"])
    flags = screen_examples(cfg, prepare_splits(cfg.data))
    assert {(f.line, f.category) for f in flags} == {(12, "violence"), (13, "self_harm"), (13, "hate")}
    assert "data.allow_flagged=true" in capsys.readouterr().err

    off = _compose(overrides[:2] + overrides[3:])  # safety_check defaults to false: no screening at all
    assert not off.data.safety_check
