"""Batched decoding in `phitune serve`: requests that arrive together decode together, and each
gets the answer it would get alone.

The tiny Phi-3 base (no adapter) behind the real app on a real loopback server, driven by the
official openai client from threads. A forward pre-hook on the model holds the first forward
pass until every request of a test is queued, so "arrived together" is deterministic; the
one-at-a-time reference is ChatGenerator.generate (what `--max-batch 1` runs).

Greedy equality: a batched step computes each row's logits with other matrix shapes than a
lone row (measured: |difference| <= 1.2e-6 on these logits), so equality of argmaxes holds
unless two tokens tie that closely; a prompt's first token is computed alone, so it is exact.
"""
from __future__ import annotations

import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlparse

import openai
import pytest
import torch

from test_serve import wait_for

KEY = "pt-test-batch"
MODEL = "support-bot"
QUESTIONS = ["How do I reset my password?", "Can I get a refund for my annual plan?", "hi",
             "Export my board to CSV please, and tell me about all the options in detail",
             "What is Tasklane?", "Why is the app slow on Android phones today?"]
# (question, stream, stop strings, max_tokens): plain, streamed, stopped by a string, cut by max_tokens
REQUESTS = [(QUESTIONS[0], False, None, 24), (QUESTIONS[1], True, None, 24), (QUESTIONS[2], False, ["help"], 24),
            (QUESTIONS[3], True, ["can"], 24), (QUESTIONS[4], True, None, 3), (QUESTIONS[5], False, None, 24)]


@pytest.fixture(scope="module")
def generator(tiny_model_cfg):
    from phitune.modeling.generate import ChatGenerator
    from phitune.modeling.loader import base_reference, load_for_inference

    model, tokenizer = load_for_inference(base_reference(tiny_model_cfg), None)
    return ChatGenerator(model, tokenizer, int(tiny_model_cfg.context_length))


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def alone(generator):
    """The one-at-a-time greedy answer of each request in REQUESTS."""
    return [generator.generate(user(q), max_tokens, 0.0, 1.0, stop) for q, _, stop, max_tokens in REQUESTS]


@contextmanager
def app_server(generator, **settings):
    from phitune.safety.filter import build_filters, load_safety_config
    from phitune.serving.app import ServerSettings, build_app
    from phitune.serving.server import ThreadedServer

    prompt_filter, completion_filter = build_filters(load_safety_config())
    app = build_app(generator, KEY, ServerSettings(model_id=MODEL, **settings), prompt_filter, completion_filter)
    with ThreadedServer(app) as server:
        server.engine = app.state.engine
        yield server


@contextmanager
def held(model, delay_s=0.0):
    """Every forward pass waits for `gate`; `rows` records each pass's batch size."""
    gate, rows = threading.Event(), []

    def hook(module, args, kwargs):
        gate.wait(60)
        rows.append(kwargs["input_ids"].shape[0])
        time.sleep(delay_s)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield gate, rows
    finally:
        gate.set()
        handle.remove()


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(url, question, stream, stop, max_tokens, **extra) -> dict:
    """One request through the openai client: the result dict of ChatGenerator (text, finish, tokens)."""
    api = client(url)
    kw = dict(model=MODEL, messages=user(question), max_tokens=max_tokens, temperature=0, stop=stop, **extra)
    if not stream:
        r = api.chat.completions.create(**kw)
        return {"text": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
                "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}
    text, finish, usage = [], None, None
    for chunk in api.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return {"text": "".join(text), "finish_reason": finish, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens}


def post(url, body):
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read()), resp.headers
    conn.close()
    return out


def batch_sizes(url) -> tuple[float, float]:
    """(requests that started decoding in a batch of 1, all requests observed) from /metrics."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    ones = float(re.search(r'^phitune_batch_size_bucket\{le="1.0"\} (\S+)$', text, re.M).group(1))
    total = float(re.search(r"^phitune_batch_size_count (\S+)$", text, re.M).group(1))
    return ones, total


def test_decoder_rows_join_and_leave_between_steps(generator):
    """Sequences of different lengths joining a running batch (left padding) and leaving it (trimmed)
    end with the one-at-a-time answers."""
    from phitune.serving.batch import BatchDecoder, Sequence

    want = [generator.generate(user(q), 20, 0.0) for q in QUESTIONS]
    decoder = BatchDecoder(generator)
    seqs = [Sequence(generator, generator.prompt_ids(user(q)), 20, 0.0, 1.0, [], None) for q in QUESTIONS]
    widths = []
    for group in (seqs[:2], seqs[2:4], seqs[4:]):  # two join, two steps, two more join, ...
        for seq in group:
            decoder.join(seq)
        for _ in range(2):
            decoder.step()
            widths.append(decoder.mask.shape[1] if decoder.rows else 0)
            decoder.leave([s for s in decoder.rows if s.done])
    assert len(decoder) == 6 - sum(s.done for s in seqs)
    while decoder.rows:
        decoder.step()
        decoder.leave([s for s in decoder.rows if s.done])
    assert [s.result() for s in seqs] == want
    assert decoder.cache is None and decoder.mask is None
    assert len(set(s["text"] for s in want)) > 2  # different prompts, different answers: not a vacuous match


def test_prompts_joining_together_run_in_one_padded_forward_and_answer_as_alone(generator):
    """Prompts of different lengths prefilled in one left-padded forward, twice (the second group into a
    running batch), end with the one-at-a-time answers; the cache's padding holds no NaN or stray values."""
    from phitune.serving.batch import BatchDecoder, Sequence

    want = [generator.generate(user(q), 20, 0.0) for q in QUESTIONS]
    decoder = BatchDecoder(generator)
    seqs = [Sequence(generator, generator.prompt_ids(user(q)), 20, 0.0, 1.0, [], None) for q in QUESTIONS]
    assert len({len(s.prompt) for s in seqs[:3]}) == 3  # the first group is padded
    with held(generator.model) as (gate, rows):
        gate.set()
        decoder.join_many(seqs[:3])
        decoder.step()
        decoder.join_many(seqs[3:])
    assert rows == [3, 3, 3]  # one prefill forward per group, one step between them
    for layer in decoder.cache.layers:
        pad = ~decoder.mask[:, None, :, None].expand_as(layer.keys)
        assert torch.isfinite(layer.keys).all() and not layer.keys[pad].any() and not layer.values[pad].any()
    while decoder.rows:
        decoder.step()
        decoder.leave([s for s in decoder.rows if s.done])
    assert [s.result() for s in seqs] == want


def test_a_prompts_forward_computes_logits_for_its_last_position_only(generator):
    """Only the last position is sampled: the lm_head of a prefill (one-at-a-time and batched) sees one
    position per row, not [prompt tokens, vocab] (128 MB for 1,000 tokens of Phi-3's vocabulary)."""
    from phitune.serving.batch import BatchDecoder, Sequence

    head = generator.model.get_output_embeddings()
    positions = []
    hook = head.register_forward_hook(lambda module, args, out: positions.append(tuple(out.shape[:2])))
    try:
        generator.generate(user(QUESTIONS[3]), 2, 0.0)
        decoder = BatchDecoder(generator)
        decoder.join_many([Sequence(generator, generator.prompt_ids(user(q)), 2, 0.0, 1.0, [], None)
                           for q in QUESTIONS[:3]])
        decoder.clear()
    finally:
        hook.remove()
    assert len(generator.prompt_ids(user(QUESTIONS[3]))) > 20  # a prompt of many positions
    assert positions == [(1, 1), (1, 1), (3, 1)]  # prefill and step alone, then three prompts together


def test_decoding_puts_a_training_model_in_eval_mode_once_not_every_step(generator, monkeypatch):
    """Module.eval() walks every submodule: the decoder calls it only when the model is training."""
    from phitune.serving.batch import BatchDecoder, Sequence

    model, calls = generator.model, []
    train = model.train
    monkeypatch.setattr(model, "train", lambda mode=True: calls.append(mode) or train(mode))
    model.train()
    decoder = BatchDecoder(generator)
    decoder.join(Sequence(generator, generator.prompt_ids(user(QUESTIONS[0])), 8, 0.0, 1.0, [], None))
    for _ in range(5):
        decoder.step()
    assert not model.training and calls == [True, False]  # the test's train(), then one eval() at the join
    decoder.clear()


def test_a_bug_in_one_requests_checks_answers_it_500_and_the_engine_keeps_serving(generator, monkeypatch):
    check = generator._check

    def buggy(messages, *args):
        if "boom" in messages[-1]["content"]:
            raise RuntimeError("a bug, not bad input")
        return check(messages, *args)

    monkeypatch.setattr(generator, "_check", buggy)
    with app_server(generator, max_batch=8, request_timeout_s=30) as server:
        status, body, _ = post(server.url, {"messages": user("boom"), "max_tokens": 3})
        assert status == 500 and body["error"]["code"] == "internal_error"
        status, body, _ = post(server.url, {"messages": user("hi"), "max_tokens": 3})
        assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_concurrent_greedy_answers_equal_one_at_a_time(generator, alone):
    with app_server(generator, max_batch=8) as server, held(generator.model) as (gate, rows), \
            ThreadPoolExecutor(len(REQUESTS)) as pool:
        futures = [pool.submit(ask, server.url, *r) for r in REQUESTS]
        wait_for(lambda: server.engine.pending == len(REQUESTS), "every request to queue")
        gate.set()
        got = [f.result() for f in futures]
        assert got == alone
        assert any(r["finish_reason"] == "length" for r in got) and any(r["finish_reason"] == "stop" for r in got)
        # one forward over all six rows happened, and /metrics saw requests join a batch of more than one
        assert max(rows) == len(REQUESTS) and server.engine.largest_batch == len(REQUESTS)
        ones, total = batch_sizes(server.url)
        assert total == len(REQUESTS) and ones == 1  # only the first request started alone
        # the first prompt ran alone (or with any queued by then), then one step, then the rest's prompts in
        # one forward: at most three passes before the first over all six rows (one prompt per pass: eleven)
        assert rows.index(len(REQUESTS)) <= 3, rows


def test_one_at_a_time_setting_never_batches(generator, alone):
    with app_server(generator, max_batch=1) as server, held(generator.model) as (gate, rows), \
            ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(ask, server.url, *r) for r in REQUESTS[:3]]
        wait_for(lambda: server.engine.pending == 3, "three requests to queue")
        gate.set()
        assert [f.result() for f in futures] == alone[:3]
        assert max(rows) == 1 and batch_sizes(server.url) == (3, 3)


def test_client_gone_mid_stream_stops_only_its_sequence(generator, alone):
    """A long sampled stream (temperature 1.5, seed 0: 300+ tokens alone) is hung up on after its
    first chunk; the greedy requests decoding beside it still get their answers."""
    with app_server(generator, max_batch=8) as server, held(generator.model, delay_s=0.005) as (gate, rows), \
            ThreadPoolExecutor(3) as pool:
        u = urlparse(server.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": user("Tell me a long story about boards and tasks"), "max_tokens": 400, "stream": True,
             "temperature": 1.5, "seed": 0}), {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        wait_for(lambda: server.engine.pending == 1, "the long stream to queue")
        futures = [pool.submit(ask, server.url, *r) for r in REQUESTS[:3]]
        wait_for(lambda: server.engine.pending == 4, "every request to queue")
        gate.set()
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        wait_for(lambda: 4 in rows, "a forward pass over all four rows")
        conn.close()  # hang up mid-batch
        assert [f.result() for f in futures] == alone[:3]
        wait_for(lambda: server.engine.pending == 0, "the abandoned sequence to leave the batch")
        assert server.engine.served == 3  # the hung-up stream was never finished
        assert len(rows) < 300  # far fewer passes than the long stream alone needs
        assert ask(server.url, *REQUESTS[0]) == alone[0]  # the batch still works after a row was dropped


def test_full_queue_is_429_with_batching(generator):
    """max_queue 2: three requests are held (as without batching), a fourth is refused, later ones work."""
    body = {"messages": user(QUESTIONS[0]), "max_tokens": 3}
    with app_server(generator, max_batch=2, max_queue=2) as server, held(generator.model) as (gate, _), \
            ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(post, server.url, body) for _ in range(3)]
        wait_for(lambda: server.engine.pending == 3, "three requests to be taken")
        status, err, headers = post(server.url, body)
        assert status == 429 and err["error"]["code"] == "rate_limit_exceeded" and headers.get("retry-after")
        gate.set()
        assert [f.result()[0] for f in futures] == [200, 200, 200]
        assert post(server.url, body)[0] == 200
        wait_for(lambda: server.engine.pending == 0, "the queue to drain")


def test_request_timeout_is_504_with_batching(generator):
    body = {"messages": user(QUESTIONS[0]), "max_tokens": 2}
    with app_server(generator, max_batch=8, request_timeout_s=1.0) as server, held(generator.model) as (gate, _):
        status, err, _ = post(server.url, body)
        assert status == 504 and err["error"]["code"] == "timeout"
        gate.set()
        wait_for(lambda: server.engine.pending == 0, "the timed-out sequence to be dropped")
        assert post(server.url, body)[0] == 200


def test_rows_of_different_adapters_share_a_batch(tiny_model_cfg):
    """Two LoRA adapters on one base: a batch mixing their rows (peft's adapter_names) answers as
    each adapter does alone."""
    import torch
    from peft import LoraConfig, get_peft_model

    from phitune.modeling.generate import ChatGenerator
    from phitune.modeling.loader import base_reference, load_for_inference
    from phitune.serving.batch import BatchDecoder, Sequence

    model, tokenizer = load_for_inference(base_reference(tiny_model_cfg), None)
    lora = dict(r=8, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False)  # random B: adapters differ
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(**lora), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(**lora))
    peft_model.eval()
    g = ChatGenerator(peft_model, tokenizer, int(tiny_model_cfg.context_length))
    rows = [(QUESTIONS[0], "a"), (QUESTIONS[0], "b"), (QUESTIONS[2], "b"), (QUESTIONS[4], None)]
    want = []
    for question, adapter in rows:
        peft_model.set_adapter(adapter or "a")
        want.append(g.generate(user(question), 12, 0.0))
    peft_model.set_adapter("a")  # the active adapter: what a row without one gets
    decoder = BatchDecoder(g)
    seqs = [Sequence(g, g.prompt_ids(user(q)), 12, 0.0, 1.0, [], None, adapter) for q, adapter in rows]
    for seq in seqs:
        decoder.join(seq)
    while decoder.rows:
        decoder.step()
        decoder.leave([s for s in decoder.rows if s.done])
    assert [s.result() for s in seqs] == want
    assert want[0] != want[1]  # the same question, two adapters, two answers: the rows really differ


def test_a_stream_behind_the_batch_takes_the_queued_deltas_at_once_and_keeps_the_next_event():
    """Job.more_deltas: the deltas already queued come as one list (the stream sends one chunk);
    the first other event stays for next_event, which returns queued events without waiting."""
    import asyncio

    from phitune.serving.engine import GenParams, Job

    async def scenario():
        params = GenParams(messages=[], max_tokens=8, temperature=0.0, top_p=1.0, stop=[], seed=None)
        job = Job(engine=None, params=params, deadline=time.monotonic() + 60, loop=asyncio.get_running_loop())
        for text in ("He", "llo", " wor", "ld"):
            job.emit("delta", text)
        job.emit("done", {"finish_reason": "stop", "completion_tokens": 4})
        job.emit("delta", "late")
        await asyncio.sleep(0)  # emit() hands each event to the loop: let them land
        first = await job.next_event()
        more = job.more_deltas()
        done = await job.next_event()
        job.deadline = time.monotonic() - 1  # past it, queued events or not: a timeout, as before
        return first, more, done, await job.next_event(), job.more_deltas()

    first, more, done, timeout, rest = asyncio.run(scenario())
    assert first == ("delta", "He") and more == ["llo", " wor", "ld"]  # stops at "done": nothing after it merged
    assert done == ("done", {"finish_reason": "stop", "completion_tokens": 4})
    assert timeout == ("timeout", None) and rest == ["late"]


def test_a_batched_step_wakes_the_event_loop_once_for_all_its_rows(generator):
    """The worker posts a step's events (a token of every row, a finished row's result) to the event
    loop in one call_soon_threadsafe, not one per event: each post writes the loop's self-pipe and
    wakes it. Every event still reaches its job, in order."""
    import asyncio

    from phitune.serving.engine import Engine, GenParams

    engine = Engine(generator, max_batch=4)

    async def scenario(gate):
        loop, posts = asyncio.get_running_loop(), []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda callback, *args: posts.append(callback) or real(callback, *args)
        jobs = [engine.submit(GenParams(user(q), 12, 0.0, 1.0, [], None), loop) for q in QUESTIONS[:4]]
        gate.set()  # all four queued: they join in one prefill
        events = []
        for job in jobs:
            kinds = []
            while not kinds or kinds[-1] not in ("done", "error", "timeout"):
                kinds.append((await job.next_event())[0])
            events.append(kinds)
        return posts, events

    try:
        with held(generator.model) as (gate, rows):
            posts, events = asyncio.run(scenario(gate))
    finally:
        engine.close()
    assert rows[0] == 4 and all(e[0] == "start" and e[-1] == "done" and set(e[1:-1]) <= {"delta"} for e in events)
    n_events = sum(len(e) for e in events)
    assert len(posts) <= len(rows) < n_events // 2  # at most one post per forward, for many events
