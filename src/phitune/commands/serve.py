"""`phitune serve MODEL_URI`: an OpenAI-compatible endpoint with auth, a content filter
and a deployment record.

    phitune serve models:/support-bot@champion                  # http://127.0.0.1:8000/v1
    PHITUNE_API_KEY=... phitune serve models:/support-bot/3 --port 8080
    phitune serve runs:/<RUN_ID>/model --content-filter azure   # Azure AI Content Safety
    phitune serve models:/support-bot@champion --safety-config strict
    phitune serve models:/support-bot@champion models:/support-bot@challenger   # one base, two adapters
    phitune serve --registered support-bot --follow 30   # every alias; re-resolved every 30 s
"""
from __future__ import annotations

import sys

from phitune.errors import PhituneError


def add_filter_arguments(parser) -> None:
    g = parser.add_argument_group("content filter (Azure AI Content Safety's categories: hate, sexual, violence, self_harm)")
    g.add_argument("--content-filter", choices=["local", "azure", "off"],
                   help="backend: local blocklists/patterns (default), azure (AZURE_CONTENT_SAFETY_ENDPOINT/_KEY), or off")
    g.add_argument("--safety-config", metavar="YAML", help="content-filter settings: a preset (default, strict) or a YAML file "
                        "(src/phitune/safety/presets/default.yaml lists every key)")
    g.add_argument("--block-at", choices=["low", "medium", "high", "off"],
                   help="block every category from this severity up (default: medium)")
    g.add_argument("--threshold", action="append", default=[], metavar="CATEGORY=LEVEL",
                   help="per-category threshold, e.g. --threshold violence=high (repeatable; LEVEL: low|medium|high|off)")


def filters_from_args(args):
    """(prompt filter, completion filter) from the content-filter flags."""
    from phitune.safety.filter import build_filters, load_safety_config

    overrides: dict = {}
    if args.content_filter:
        overrides["backend"] = args.content_filter
    if args.block_at:
        overrides["block_at"] = args.block_at
    thresholds = {}
    for item in args.threshold:
        cat, sep, level = item.partition("=")
        if not sep or not cat or not level:
            raise PhituneError(f"--threshold {item!r}: expected CATEGORY=LEVEL, e.g. violence=high")
        thresholds[cat.strip()] = level.strip()
    if thresholds:
        overrides["thresholds"] = thresholds
    return build_filters(load_safety_config(args.safety_config, overrides))


def describe_filter(prompt_filter, completion_filter) -> str:
    if not prompt_filter.enabled and not completion_filter.enabled:
        return "off"
    parts = []
    for what, f in (("prompts", prompt_filter), ("completions", completion_filter)):
        if f.enabled:
            th = {c: {2: "low", 4: "medium", 6: "high"}.get(t, "off") for c, t in f.thresholds.items()}
            levels = set(th.values())
            shown = f"blocking at {levels.pop()}" if len(levels) == 1 else ", ".join(f"{c}>={v}" for c, v in th.items())
            parts.append(f"{what}: {f.backend_name}, {shown}")
    return "; ".join(parts)


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model as an OpenAI-compatible endpoint",
                              description=" ".join(__doc__.split("\n\n")[0].split()),
                              epilog="API, errors, content filter and deployments: docs/serving.md")
    p.add_argument("model_uris", metavar="MODEL_URI", nargs="*",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a model folder; several: "
                        "LoRA adapters of one base, loaded once, each picked by the request's model "
                        "(NAME@ALIAS, NAME/VERSION, RUN_ID)")
    p.add_argument("--registered", action="append", default=[], metavar="NAME",
                   help="serve every aliased version of this registered model, as NAME@ALIAS (repeatable)")
    p.add_argument("--follow", type=float, metavar="SECONDS",
                   help="re-resolve aliases every SECONDS; a moved alias's new version is loaded in the background "
                        "and swapped in between requests, the old one unloaded")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="file whose first line is the API key (else $PHITUNE_API_KEY, else a key is generated and printed once)")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    p.add_argument("--served-name", help="model id in responses and /v1/models, for a single MODEL_URI (default: the "
                                         "registered model's name)")
    p.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait behind the running one; more get 429 (default: 16)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests decoded together, one forward pass per token for all of them (default: 8; "
                        "1: one at a time)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="per-request limit, waiting included; then 504 (default: 120)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, metavar="N", help="larger bodies get 413 (default: 1000000)")
    p.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                   help="max_tokens when a request sets none (default: 256)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads for generation (default: torch's choice, one per core); a small model on a "
                        "busy machine is often fastest with 1")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--log-requests", metavar="FILE",
                   help="append one chat JSONL line per answered request (the format `phitune data validate` and "
                        "data.train_file= read, with the model version); content redacted unless --log-request-content")
    p.add_argument("--log-request-content", action="store_true",
                   help="keep the messages' text in --log-requests and traces (it may hold personal data)")
    p.add_argument("--trace-sample", type=float, default=0.0, metavar="RATE",
                   help="log this fraction of chat calls as MLflow traces in the tracking store (default: 0, off; "
                        "0.1: about one in ten)")
    p.add_argument("--trace-experiment", default="phitune-serving", metavar="NAME",
                   help="MLflow experiment of those traces (default: phitune-serving)")
    add_filter_arguments(p)
    p.set_defaults(func=_serve)


def _follow(models, seconds: float, dep_id: str, tracking_uri: str, engine) -> None:
    """Start --follow: the deployment record lists every version the server holds, as it changes."""
    from phitune.deployments import update_models
    from phitune.serving.models import followed

    moving = followed(models)
    if not moving:
        print("  --follow: no MODEL_URI names an alias or `latest`, so nothing can move", file=sys.stderr, flush=True)
        return
    models.on_change = lambda held: update_models(dep_id, held, tracking_uri)
    models.follow(seconds, idle=lambda: engine.pending == 0)
    print(f"  following {', '.join(moving)}: re-resolved every {seconds:g} s", flush=True)


def _serve(args) -> int:
    try:
        return _run(args)
    except PhituneError as exc:
        print(f"phitune serve: {exc}", file=sys.stderr)
        return exc.exit_code


def _load(args, tracking_uri: str):
    """(model set or None, classifier or None, generator, sources): the models named on the command line."""
    from phitune.classify.serving import NoGeneration, load_classifier
    from phitune.models.uri import resolve
    from phitune.serving.models import load_models, registered_uris

    uris = list(args.model_uris) + [u for name in args.registered for u in registered_uris(name, tracking_uri)]
    if not uris:
        raise PhituneError("give a MODEL_URI (or several), or --registered NAME")
    print(f"loading {' '.join(uris)} ...", file=sys.stderr, flush=True)
    sources = [resolve(u, tracking_uri) for u in uris]
    single = len(args.model_uris) == 1 and not args.registered
    classifier = load_classifier(sources[0]) if single else None  # None for a chat model
    if classifier is not None:
        if args.follow:
            raise PhituneError("--follow swaps chat models' LoRA adapters; a classifier is served as it was loaded")
        return None, classifier, NoGeneration(classifier.context_length), sources
    models = load_models(uris, sources, tracking_uri, args.served_name, single)
    return models, None, models.generator, sources


def _describe(models, sources) -> str:
    if models is None or models.single:
        version = f" version {sources[0].model_version}" if sources[0].model_version else ""
        return f"{sources[0].uri} ({sources[0].served_name}{version})"
    return f"{len(models.names)} models ({', '.join(models.names)})"


def _run(args) -> int:
    from phitune.models.uri import tracking_uri as default_tracking_uri
    from phitune.serving.app import ServerSettings, build_app
    from phitune.serving.auth import resolve_api_key
    from phitune.serving.server import bind, record_local_deployment, serve_forever, url_for, warn_if_exposed

    if not 0 <= args.port <= 65535:
        raise PhituneError(f"--port {args.port}: expected 0-65535")
    for flag, value in (("--max-queue", args.max_queue), ("--max-batch", args.max_batch),
                        ("--max-body-bytes", args.max_body_bytes),
                        ("--default-max-tokens", args.default_max_tokens)):
        if value < (0 if flag == "--max-queue" else 1):
            raise PhituneError(f"{flag} {value}: too small")
    if args.timeout <= 0:
        raise PhituneError(f"--timeout {args.timeout}: must be positive")
    if args.follow is not None and args.follow <= 0:
        raise PhituneError(f"--follow {args.follow:g}: must be a positive number of seconds")
    if args.threads is not None:
        if args.threads < 1:
            raise PhituneError(f"--threads {args.threads}: must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    prompt_filter, completion_filter = filters_from_args(args)  # a bad filter config fails before the model loads
    from phitune.serving.traces import check_rate

    check_rate(args.trace_sample)
    if args.log_request_content and not (args.log_requests or args.trace_sample):
        raise PhituneError("--log-request-content needs --log-requests FILE or --trace-sample RATE")
    request_log = None
    if args.log_requests:
        from phitune.serving.request_log import RequestLog

        request_log = RequestLog(args.log_requests, keep_content=args.log_request_content)
    key, key_source = resolve_api_key(args.api_key_file)
    tracking_uri = default_tracking_uri(args.tracking_uri)

    models, classifier, generator, sources = _load(args, tracking_uri)
    source = sources[0]
    info = {"context_length": generator.context_length}
    if models is None or models.single:  # several: each model's card has its own version and uri
        info = {"version": source.model_version, "uri": source.uri, **info}
    settings = ServerSettings(
        model_id=models.names[0] if models else args.served_name or source.served_name,
        max_body_bytes=args.max_body_bytes, default_max_tokens=args.default_max_tokens,
        request_timeout_s=args.timeout, max_queue=args.max_queue, max_batch=args.max_batch, model_info=info)
    tracer = None
    if args.trace_sample > 0:
        from phitune.serving.traces import Tracer

        tracer = Tracer(tracking_uri, args.trace_sample, args.trace_experiment, args.log_request_content)
    app = build_app(generator, key, settings, prompt_filter, completion_filter, request_log, tracer,
                    classifier=classifier, models=models)

    sock = bind(args.host, args.port)
    warn_if_exposed(args.host)
    url = url_for(sock, args.host)
    filter_text = describe_filter(prompt_filter, completion_filter)
    record = record_local_deployment(source, url, tracking_uri, filter_text, models.records() if models else None)
    print(f"serving {_describe(models, sources)} at {url}/v1", flush=True)
    print(f"  deployment {record['id']}: `phitune deployments list`, `phitune undeploy {record['id']}`", flush=True)
    if args.follow:
        _follow(models, args.follow, record["id"], tracking_uri, app.state.engine)
    print(f"  content filter: {filter_text}", flush=True)
    print(f"  metrics: {url}/metrics (Prometheus), `phitune deployments show {record['id']}`", flush=True)
    if request_log is not None:
        kept = "content kept" if request_log.keep_content else "content redacted"
        print(f"  request log: {request_log.path} ({kept})", flush=True)
    if tracer is not None:
        print(f"  MLflow traces: {tracer.rate:g} of the calls, experiment {tracer.experiment} in {tracking_uri}",
              flush=True)
    if key_source == "generated":
        print(f"  API key (generated; shown once, set PHITUNE_API_KEY to choose one): {key}", flush=True)
    else:
        print(f"  API key: from {'--api-key-file' if key_source == 'file' else '$PHITUNE_API_KEY'}", flush=True)
    print(f"  try: phitune chat --url {url} --prompt 'Hello'", flush=True)
    serve_forever(app, sock, args.log_level)
    return 0
