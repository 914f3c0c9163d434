"""Serving a fine-tuned model as an OpenAI-compatible web service (`phitune serve`).

    model_source  models:/NAME@ALIAS | models:/NAME/VERSION | runs:/ID/model -> ChatGenerator
    app           FastAPI app: /v1/chat/completions (plain + SSE), /v1/models, /health
    auth          API key resolution and constant-time checks
    schemas       request validation, OpenAI-style errors
    engine        one generation at a time, bounded queue, per-request deadline
    server        binding, deployment record, a server thread for tests and `phitune chat`
"""
