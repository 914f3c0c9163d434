"""Serving a fine-tuned model as an OpenAI-compatible web service (`phitune serve`).

    (models are resolved by phitune.models.uri and loaded by phitune.modeling.generate.load_generator)
    app           FastAPI app: /v1/chat/completions (plain + SSE), /v1/models, /health
    auth          API key resolution and constant-time checks
    schemas       request validation, OpenAI-style errors
    engine        one generation at a time, bounded queue, per-request deadline
    server        binding, deployment record, a server thread for tests and `phitune chat`
"""
