"""The policy-inference generation engine: continuous batching, seeds, stops, backpressure, weight swaps."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from kit import WAIT, tiny_gpt, tiny_tokenizer

from chatrl.services.core.generate import SamplingParams, generate
from chatrl.services.core.model import GPT
from chatrl.services.policy.engine import (
    EngineClosed,
    GenerationEngine,
    InvalidRequest,
    NotLoaded,
    QueueFull,
    RequestCancelled,
    RequestTooLarge,
    StaleVersion,
    StreamDelta,
    StreamEnd,
    VersionMismatch,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_model(tok, seed: int, max_seq_len: int = 64) -> GPT:
    return tiny_gpt(tok.vocab_size, seed, max_seq_len)


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok, 0)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.prompt_ids("How was the film?"), tok.prompt_ids("hello"),
            tok.prompt_ids("Tell me about the story, the cast and the music.", system="be kind"),
            tok.encode("the film")]


@pytest.fixture()
def engine(model, tok):
    eng = GenerationEngine(model, tok, version=1, max_batch_size=32)
    yield eng
    eng.shutdown()


def reference(model, tok, prompt, params: SamplingParams, n: int = 1, ends: bool = True):
    """What chatrl.services.core.generate gives for sample j (seed + j), each alone."""
    out = []
    for j in range(n):
        p = replace(params, seed=None if params.seed is None else params.seed + j,
                    stop_token_ids=tuple(params.stop_token_ids) + ((tok.end_id, tok.eot_id) if ends else ()))
        out.append(generate(model, [prompt], p, pad_id=tok.pad_id)[0])
    return out


def assert_same(completions, ref, version=None):
    assert len(completions) == len(ref)
    for c, r in zip(completions, ref):
        assert c.token_ids == r.tokens
        assert c.logprobs == pytest.approx(r.logprobs, abs=1e-4)
        assert c.finish_reason == r.finish_reason
        if version is not None:
            assert c.model_version == version


PARAMS = [SamplingParams(max_new_tokens=10, seed=1),
          SamplingParams(max_new_tokens=7, temperature=0.7, top_k=20, seed=2),
          SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.8, seed=3),
          SamplingParams(max_new_tokens=9, temperature=0)]


def test_results_equal_generate_alone_and_batched(engine, model, tok, prompts):
    # alone, one request at a time
    for pr, sp in zip(prompts, PARAMS):
        res = engine.submit(pr, sp, n=3).result(WAIT)
        assert res.model_version == 1 and res.prompt_ids == [pr]
        assert_same(res.samples, reference(model, tok, pr, sp, 3), version=1)
    # all at once (batched together, different lengths and parameters), plus a multi-prompt request
    engine.pause()
    handles = [engine.submit(pr, sp, n=3) for pr, sp in zip(prompts, PARAMS)]
    multi = engine.submit_batch(prompts, PARAMS[0], n=2)
    engine.resume()
    for h, pr, sp in zip(handles, prompts, PARAMS):
        assert_same(h.result(WAIT).samples, reference(model, tok, pr, sp, 3))
    res = multi.result(WAIT)
    for pr, comps in zip(prompts, res.completions):
        assert_same(comps, reference(model, tok, pr, PARAMS[0], 2))
    assert engine.stats.max_batch_size_seen >= 12 + 8
    # texts are the decoded tokens
    c = res.completions[0][0]
    assert c.text == tok.decode(c.token_ids)


def test_concurrent_requests_share_forward_passes(model, tok, prompts):
    with GenerationEngine(model, tok, end_token_ids=()) as eng:  # no end token: exactly 8 tokens each
        sp = SamplingParams(max_new_tokens=8, seed=7)
        # deterministic: the 16 requests are all queued before the engine admits any
        eng.pause()
        barrier = threading.Barrier(16)
        handles = [None] * 16

        def client(i):
            barrier.wait(WAIT)
            handles[i] = eng.submit(prompts[i % len(prompts)], sp)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert eng.stats.queue_depth == 16
        eng.resume()
        results = [h.result(WAIT) for h in handles]
        st = eng.stats
        assert all(len(r.samples[0].token_ids) == 8 for r in results)
        assert st.tokens_generated == 16 * 8
        assert st.forward_passes == 8  # one prefill for all 16 + 7 decode steps
        assert st.batch_size_hist == {16: 8}
        assert results[0].samples[0].token_ids == results[4].samples[0].token_ids  # same prompt, same seed

        # free-running: 16 clients at once, no pause; still far fewer passes than 16 × 8
        before = eng.stats.forward_passes
        barrier.reset()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        again = [h.result(WAIT) for h in handles]
        passes = eng.stats.forward_passes - before
        assert passes < 16 * 8 // 2
        assert [r.samples[0].token_ids for r in again] == [r.samples[0].token_ids for r in results]


def test_request_joins_mid_flight(model, tok, prompts):
    reached, go = threading.Event(), threading.Event()
    steps = []

    def on_step(info):
        steps.append(info.batch_size)
        if len(steps) == 3:  # hold the decode thread once, with the first request running
            reached.set()
            go.wait(WAIT)

    a_params = SamplingParams(max_new_tokens=20, seed=11)
    b_params = SamplingParams(max_new_tokens=5, seed=12, temperature=0.8)
    with GenerationEngine(model, tok, on_step=on_step, end_token_ids=()) as eng:
        a = eng.submit(prompts[2], a_params)
        assert reached.wait(WAIT)
        b = eng.submit(prompts[1], b_params, n=2)
        go.set()
        ra, rb = a.result(WAIT), b.result(WAIT)
        st = eng.stats
    ref_a = reference(model, tok, prompts[2], a_params, ends=False)
    ref_b = reference(model, tok, prompts[1], b_params, 2, ends=False)
    assert_same(ra.samples, ref_a)
    assert_same(rb.samples, ref_b)
    assert steps[:3] == [1, 1, 1] and 3 in steps  # b's two rows joined a's running batch
    assert st.prefill_passes == 2
    assert st.forward_passes < 20 + 5  # a alone (20) + b alone (5)


def test_stop_strings_and_streaming(engine, model, tok, prompts):
    greedy = SamplingParams(max_new_tokens=40, seed=5)  # seeded: the same tokens every time
    full = engine.submit(prompts[0], greedy).result(WAIT).samples[0]
    text = full.text
    # a stop string from the middle of the sampled text (free of replacement characters)
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2]
                and text.find(text[i:i + 2]) >= 1)
    cut = text.find(stop)
    k = next(k for k in range(1, len(full.token_ids) + 1) if stop in tok.decode(full.token_ids[:k]))
    res = engine.submit(prompts[0], greedy, stop=[stop, "\x00never"]).result(WAIT).samples[0]
    assert res.finish_reason == "stop"
    assert res.text == text[:cut]
    assert res.token_ids == full.token_ids[:k]  # tokens up to the one completing the match

    # the same through the stream: deltas then one end; texts add up to the final text
    events = list(engine.stream(prompts[0], greedy, stop=[stop]))
    deltas, end = events[:-1], events[-1]
    assert all(isinstance(d, StreamDelta) for d in deltas) and isinstance(end, StreamEnd)
    assert sum((d.token_ids for d in deltas), []) == res.token_ids == end.completion.token_ids
    assert "".join(d.text for d in deltas) == res.text == end.completion.text
    assert end.model_version == 1 and end.prompt_ids == prompts[0]
    assert all(stop not in d.text for d in deltas)

    # stop token ids (the sampled path's third token) stop generation, the token included
    sp = replace(greedy, stop_token_ids=(full.token_ids[2],))
    r = engine.submit(prompts[0], sp).result(WAIT).samples[0]
    assert r.token_ids == full.token_ids[:full.token_ids.index(full.token_ids[2]) + 1]
    assert r.finish_reason == "stop"


def test_max_seq_len_caps_generation_and_validation(engine, tok):
    long_prompt = [5] * 60  # max_seq_len 64 leaves room for 4 tokens
    r = engine.submit(long_prompt, SamplingParams(max_new_tokens=20, seed=0)).result(WAIT).samples[0]
    assert r.finish_reason == "length" and len(r.token_ids) <= 4
    with pytest.raises(InvalidRequest, match="max_seq_len"):
        engine.submit([5] * 64, SamplingParams(max_new_tokens=1))
    with pytest.raises(InvalidRequest, match="out of range"):
        engine.submit([5, tok.vocab_size], SamplingParams(max_new_tokens=1))
    with pytest.raises(InvalidRequest, match="out of range"):
        engine.submit([-1], SamplingParams(max_new_tokens=1))
    with pytest.raises(InvalidRequest, match="empty"):
        engine.submit([], SamplingParams(max_new_tokens=1))
    with pytest.raises(InvalidRequest, match="top_p"):
        engine.submit([5], SamplingParams(top_p=float("nan")))
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        engine.submit([5], SamplingParams(max_new_tokens=65))
    with pytest.raises(InvalidRequest, match="n must"):
        engine.submit([5], SamplingParams(), n=0)
    with pytest.raises(VersionMismatch):
        engine.submit([5], SamplingParams(max_new_tokens=1), expected_version=7)
    assert engine.submit([5], SamplingParams(max_new_tokens=1), expected_version=1).result(WAIT).model_version == 1


def test_queue_full_cancel_and_large_requests(model, tok, prompts):
    with GenerationEngine(model, tok, max_queue=2, max_batch_size=4, max_request_rows=8) as eng:
        eng.pause()
        sp = SamplingParams(max_new_tokens=4, seed=5)
        a = eng.submit(prompts[0], sp, n=6)  # more rows than the batch holds: admitted in parts
        b = eng.submit(prompts[1], sp)
        with pytest.raises(QueueFull):
            eng.submit(prompts[1], sp)
        assert eng.stats.requests_rejected == 1
        b.cancel()  # a queued request leaves the queue at once
        with pytest.raises(RequestCancelled):
            b.result(WAIT)
        c = eng.submit(prompts[1], sp)  # room again
        with pytest.raises(RequestTooLarge):
            eng.submit(prompts[1], sp, n=9)
        eng.resume()
        assert_same(a.result(WAIT).samples, reference(model, tok, prompts[0], sp, 6))
        assert_same(c.result(WAIT).samples, reference(model, tok, prompts[1], sp))
        assert eng.stats.max_batch_size_seen == 4


def test_cancel_running_request_and_stream(model, tok, prompts):
    go = threading.Event()

    def on_step(info):
        go.wait(WAIT)  # the decode thread waits after each step until the client has acted

    with GenerationEngine(model, tok, end_token_ids=(), on_step=on_step) as eng:
        sp = SamplingParams(max_new_tokens=50, seed=1)
        stream = eng.stream(prompts[1], sp)
        first = next(stream)  # pushed before the decode thread blocks in on_step
        assert isinstance(first, StreamDelta) and first.model_version == 1 and len(first.token_ids) == 1
        stream.close()  # the client went away: its row leaves the batch at the next step
        eng.pause()
        h = eng.submit(prompts[1], sp)
        got = threading.Event()
        h.add_done_callback(lambda _h: got.set())
        h.cancel()
        assert got.wait(WAIT)
        with pytest.raises(RequestCancelled):
            h.result(WAIT)
        eng.resume()
        go.set()
        # the engine keeps serving
        ok = eng.submit(prompts[0], SamplingParams(max_new_tokens=3, seed=2)).result(WAIT)
        assert len(ok.samples[0].token_ids) == 3
        st = eng.stats
        assert st.requests_cancelled == 2 and st.active_rows == 0
        assert st.tokens_generated == 1 + 3  # the stream's row left after its first token


def test_update_weights_with_requests_in_flight(tok, prompts):
    old, new = make_model(tok, 0), make_model(tok, 1)
    reached, go = threading.Event(), threading.Event()
    steps = []

    def on_step(info):
        steps.append(info)
        if len(steps) == 2:
            reached.set()
            go.wait(WAIT)

    sp = SamplingParams(max_new_tokens=12, seed=3)
    with GenerationEngine(make_model(tok, 0), tok, version=1, on_step=on_step, end_token_ids=()) as eng:
        a = eng.submit(prompts[0], sp, n=2)
        assert reached.wait(WAIT)  # a is running on version 1
        prev = eng.update_weights(new.state_dict(), 2, meta={"checkpoint_uri": "push:2"})
        assert prev == 1 and eng.version == 2 and eng.active_version == 1
        b = eng.submit(prompts[0], sp, n=2)  # waits for the old batch to drain, then runs on version 2
        with pytest.raises(VersionMismatch):
            eng.submit(prompts[0], sp, expected_version=1)
        for bad in (2, 1):
            with pytest.raises(StaleVersion):
                eng.update_weights(new.state_dict(), bad)
        go.set()
        ra, rb = a.result(WAIT), b.result(WAIT)
        assert ra.model_version == 1 and rb.model_version == 2
        assert_same(ra.samples, reference(old, tok, prompts[0], sp, 2, ends=False), version=1)
        assert_same(rb.samples, reference(new, tok, prompts[0], sp, 2, ends=False), version=2)
        assert eng.active_version == 2 and eng.stats.weight_swaps == 1
        assert max(s.batch_size for s in steps) == 2  # a and b never shared a batch
        assert eng.latest.meta == {"checkpoint_uri": "push:2"}

        # weights that do not fit are refused and change nothing
        sd = new.state_dict()
        with pytest.raises(ValueError, match="shape"):
            eng.update_weights({**sd, "ln_f.weight": torch.ones(3)}, 3)
        with pytest.raises(ValueError, match="missing"):
            eng.update_weights({k: v for k, v in sd.items() if k != "ln_f.bias"}, 3)
        with pytest.raises(ValueError, match="NaN"):
            eng.update_weights({**sd, "ln_f.bias": torch.full_like(sd["ln_f.bias"], float("nan"))}, 3)
        assert eng.version == 2
        # a whole model object, waiting until it is active
        user = make_model(tok, 0)
        assert eng.update_weights(user, 5, wait=True, timeout=WAIT) == 2
        assert eng.active_version == 5
        assert_same(eng.submit(prompts[0], sp).result(WAIT).samples, reference(old, tok, prompts[0], sp, ends=False))
        # state-dict updates are copied into retired engine-built models (no fresh allocation), never into a
        # model the caller passed in or one still serving
        user_sd = {k: v.clone() for k, v in user.state_dict().items()}
        built = {}
        for version, m in ((6, new), (7, old), (8, new), (9, old)):
            eng.update_weights(m.state_dict(), version, wait=True, timeout=WAIT)
            built[version] = eng.latest.model
            res = eng.submit(prompts[0], sp).result(WAIT)
            assert res.model_version == version
            assert_same(res.samples, reference(m, tok, prompts[0], sp, ends=False), version=version)
        assert built[8] is built[6] and built[9] is built[7] and built[6] is not built[7]
        assert all(torch.equal(user.state_dict()[k], user_sd[k]) for k in user_sd)


def test_no_model_then_loaded_and_shutdown(model, tok, prompts):
    eng = GenerationEngine(None, tok)
    try:
        assert not eng.loaded and eng.version == 0
        with pytest.raises(NotLoaded):
            eng.submit(prompts[0], SamplingParams(max_new_tokens=2))
        with pytest.raises(NotLoaded):
            eng.update_weights(model.state_dict(), 1)
        eng.update_weights(model, 1)
        assert eng.submit(prompts[0], SamplingParams(max_new_tokens=2)).result(WAIT).model_version == 1
        # drain: queued work finishes before the engine stops
        eng.pause()
        h = eng.submit(prompts[0], SamplingParams(max_new_tokens=3, seed=0))
        eng.shutdown(drain=True, timeout=WAIT)
        assert len(h.result(WAIT).samples[0].token_ids) <= 3
        with pytest.raises(EngineClosed):
            eng.submit(prompts[0], SamplingParams(max_new_tokens=2))
    finally:
        eng.shutdown()
    # without drain, queued requests fail fast
    eng = GenerationEngine(model, tok)
    eng.pause()
    h = eng.submit(prompts[0], SamplingParams(max_new_tokens=3))
    eng.shutdown(timeout=WAIT)
    with pytest.raises(EngineClosed):
        h.result(WAIT)
    assert not eng._thread.is_alive()
