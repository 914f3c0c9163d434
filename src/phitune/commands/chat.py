"""`phitune chat`: talk to an endpoint from the terminal, to test it.

    phitune chat --url http://127.0.0.1:8000 --prompt "How do I export my board?"   # one question
    phitune chat --url http://127.0.0.1:8000                                       # interactive
    phitune chat models:/support-bot@champion                                      # serve it here, then chat

With --url it talks to a running server (`phitune serve`) through the openai client,
with the key from --api-key, --api-key-file or $PHITUNE_API_KEY. With MODEL_URI it
starts the same server in this process on a free loopback port, for this session only
(no deployment record). Tokens are printed as they stream.
"""
from __future__ import annotations

import os
import sys

from phitune.commands.serve import add_filter_arguments
from phitune.errors import PhituneError

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D)"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a served model in the terminal (or ask one question)",
                              description=__doc__.splitlines()[0])
    p.add_argument("model_uri", nargs="?", metavar="MODEL_URI",
                   help="serve this model here for the session (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model)")
    p.add_argument("--url", help="a running endpoint, e.g. http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument("--prompt", help="ask this one question, print the answer and exit")
    p.add_argument("--system", help="a system message that opens the conversation")
    p.add_argument("--api-key", help="the endpoint's key (default: $PHITUNE_API_KEY)")
    p.add_argument("--api-key-file", metavar="FILE", help="file whose first line is the endpoint's key")
    p.add_argument("--model", help="model id to send (default: the first one the endpoint lists)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer instead of streaming it")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="client timeout per request")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for MODEL_URI")
    add_filter_arguments(p)
    p.set_defaults(func=_chat)


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


def _error_text(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            code = f" [{err['code']}]" if err.get("code") else ""
            status = getattr(exc, "status_code", None)
            return f"{status or 'error'}{code}: {err['message']}"
    return str(exc)


class ChatSession:
    def __init__(self, client, model: str, args, out=None, err=None):
        self.client, self.model, self.args = client, model, args
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.history = [{"role": "system", "content": args.system}] if args.system else []

    def ask(self, text: str) -> bool:
        """Send one user turn, print the answer; False when the request failed."""
        import openai

        messages = self.history + [{"role": "user", "content": text}]
        params = dict(model=self.model, messages=messages, max_tokens=self.args.max_tokens,
                      temperature=self.args.temperature, top_p=self.args.top_p)
        if self.args.seed is not None:
            params["seed"] = self.args.seed
        answer, finish, results = "", None, None
        try:
            if self.args.no_stream:
                resp = self.client.chat.completions.create(**params)
                choice = resp.choices[0]
                answer, finish = choice.message.content or "", choice.finish_reason
                results = (choice.model_extra or {}).get("content_filter_results")
                self.out.write(answer)
            else:
                stream = self.client.chat.completions.create(stream=True, **params)
                try:
                    for chunk in stream:
                        for choice in chunk.choices:  # Azure-style first chunk: no choices
                            if choice.delta and choice.delta.content:
                                answer += choice.delta.content
                                self.out.write(choice.delta.content)
                                self.out.flush()
                            if choice.finish_reason:
                                finish = choice.finish_reason
                                results = (choice.model_extra or {}).get("content_filter_results")
                except KeyboardInterrupt:
                    stream.close()
                    finish = "interrupted"
        except openai.APIStatusError as exc:
            print(f"error {_error_text(exc)}", file=self.err)
            return False
        except openai.APIConnectionError as exc:
            print(f"error: cannot reach {self.client.base_url}: {exc}", file=self.err)
            return False
        except openai.APIError as exc:  # an error event inside the stream
            print(f"\nerror: {exc.message if hasattr(exc, 'message') else exc}", file=self.err)
            return False
        self.out.write("\n")
        self.out.flush()
        if finish == "content_filter":
            flagged = ", ".join(f"{c} {v.get('severity')}" for c, v in (results or {}).items()
                                if isinstance(v, dict) and v.get("filtered"))
            print(f"[the content filter stopped this answer{': ' + flagged if flagged else ''}]", file=self.err)
            return True  # not added to the history
        if finish == "length":
            print("[stopped at max_tokens]", file=self.err)
        self.history = messages + [{"role": "assistant", "content": answer}]
        return True

    def repl(self, read=input) -> int:
        print(f"chatting with {self.model} at {self.client.base_url}; {HELP}", file=self.err)
        while True:
            try:
                line = read("you> ")
            except EOFError:
                print(file=self.err)
                return 0
            except KeyboardInterrupt:
                print(file=self.err)
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                self.history = self.history[:1] if self.args.system else []
                print("(conversation reset)", file=self.err)
                continue
            if text in ("/help", "/?"):
                print(HELP, file=self.err)
                continue
            self.out.write("assistant> ")
            self.ask(text)


def _chat(args) -> int:
    try:
        return _run(args)
    except PhituneError as exc:
        print(f"phitune chat: {exc}", file=sys.stderr)
        return exc.exit_code


def _run(args) -> int:
    if bool(args.model_uri) == bool(args.url):
        raise PhituneError("give either MODEL_URI (serve it here) or --url URL (a running endpoint)")
    server = None
    try:
        if args.url:
            from phitune.serving.auth import read_key_file

            key = args.api_key or (read_key_file(args.api_key_file) if args.api_key_file else None) \
                or os.environ.get("PHITUNE_API_KEY")
            if not key:
                raise PhituneError("the endpoint needs an API key: --api-key, --api-key-file or $PHITUNE_API_KEY")
            base_url = _base_url(args.url)
        else:
            server, key = _local_server(args)
            base_url = server.url + "/v1"
        return _talk(args, base_url, key)
    finally:
        if server is not None:
            server.stop()


def _local_server(args):
    from phitune.commands.serve import filters_from_args
    from phitune.modeling.generate import load_generator
    from phitune.models.uri import resolve
    from phitune.serving.app import ServerSettings, build_app
    from phitune.serving.auth import generate_key
    from phitune.serving.server import ThreadedServer

    prompt_filter, completion_filter = filters_from_args(args)
    print(f"loading {args.model_uri} ...", file=sys.stderr, flush=True)
    source = resolve(args.model_uri, args.tracking_uri)
    generator = load_generator(source)
    key = generate_key()
    app = build_app(generator, key, ServerSettings(model_id=source.served_name), prompt_filter, completion_filter)
    return ThreadedServer(app).start(), key


def _talk(args, base_url: str, key: str) -> int:
    try:
        import openai
    except ImportError:
        raise PhituneError("phitune chat needs the openai package: pip install 'phitune[serve]'") from None
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=1, timeout=args.timeout)
    model = args.model
    if not model:
        try:
            models = client.models.list().data
        except openai.APIStatusError as exc:
            raise PhituneError(f"{base_url}: {_error_text(exc)}") from None
        except openai.APIConnectionError:
            raise PhituneError(f"cannot reach {base_url}; is the server running? (phitune deployments list)") from None
        model = models[0].id if models else "default"
    session = ChatSession(client, model, args)
    if args.prompt is not None:
        return 0 if session.ask(args.prompt) else 1
    return session.repl()
