"""The LLM client and the judges, against a real local OpenAI-compatible HTTP server."""

from __future__ import annotations

import json
import logging

import pytest
from openai_server import (
    OpenAIServer,
    reply_error,
    reply_json,
    reply_slow,
    reply_text,
)

from em_circuits.core.llm import LLMClient
from em_circuits.core.llm_endpoint import find_api_key, find_base_url
from em_circuits.core.llm_errors import LLMError
from em_circuits.core.store import ResultsStore, write_artifact
from em_circuits.core.verdicts import verdict_of
from em_circuits.labeling.judge import RUBRIC_VERSION, JudgeError, WordListJudge, load_word_lists
from em_circuits.labeling.llm_judge import LLMJudge, few_shot_block

KEY = "sk-test-SECRET-0123456789"


@pytest.fixture()
def server():
    with OpenAIServer() as srv:
        yield srv


@pytest.fixture()
def sleeps():
    return []


@pytest.fixture()
def client(server, sleeps):
    return LLMClient(
        model="test-model",
        api_key=KEY,
        base_url=server.base_url,
        timeout=2.0,
        max_tries=3,
        backoff_base=0.01,
        sleep=sleeps.append,
    )


def ask(client, validate=lambda x: x):
    return client.chat_json(
        [{"role": "user", "content": "hi"}], validate, json_schema={"type": "object"}
    )


# -- the client ------------------------------------------------------------------------------------
def test_normal_reply_sends_key_and_schema(server, client):
    server.push(reply_json({"answer": 42}))
    value, raw, _ = ask(client)
    assert value == {"answer": 42} and json.loads(raw) == value
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"
    assert server.requests[0]["response_format"]["type"] == "json_schema"
    assert server.requests[0]["model"] == "test-model"


def test_reasoning_models_get_completion_token_limit(server, sleeps):
    o3 = LLMClient(model="o3", api_key=KEY, base_url=server.base_url, temperature=0.5)
    server.push(reply_text("ok"))
    o3.chat([{"role": "user", "content": "hi"}])
    body = server.requests[0]
    assert "max_completion_tokens" in body and "temperature" not in body


def test_429_then_success_backs_off(server, client, sleeps, caplog):
    server.push(reply_error(429, "rate limited", retry_after=0.02), reply_json({"ok": True}))
    with caplog.at_level(logging.WARNING, logger="em_circuits.llm"):
        value, _, _ = ask(client)
    assert value == {"ok": True}
    assert len(server.requests) == 2 and len(sleeps) == 1 and sleeps[0] >= 0.02
    assert "HTTP 429" in caplog.text and "try 1/3" in caplog.text


def test_server_errors_exhaust_tries_with_clear_error(server, client, sleeps):
    server.push(*[reply_error(503, "overloaded")] * 3)
    with pytest.raises(LLMError, match=r"gave up after 3 tries; last error: HTTP 503"):
        ask(client)
    assert len(server.requests) == 3
    assert sleeps[1] > sleeps[0]  # exponential


# A slow reply outlasts the client's 2 s timeout by far, and a prompt one fits well inside it,
# even on a loaded machine.
SLOW = 6.0


def test_timeout_then_success(server, sleeps):
    fast = LLMClient(
        model="m",
        api_key=KEY,
        base_url=server.base_url,
        timeout=2.0,
        max_tries=2,
        backoff_base=0.01,
        sleep=sleeps.append,
    )
    server.push(reply_slow(SLOW, reply_json({"late": True})), reply_json({"ok": 1}))
    value, _, _ = ask(fast)
    assert value == {"ok": 1} and len(server.requests) == 2


@pytest.mark.slow
def test_persistent_timeout_is_a_clear_error(server, sleeps):
    fast = LLMClient(
        model="m",
        api_key=KEY,
        base_url=server.base_url,
        timeout=2.0,
        max_tries=2,
        backoff_base=0.01,
        sleep=sleeps.append,
    )
    server.push(*[reply_slow(SLOW, reply_json({}))] * 2)
    with pytest.raises(LLMError, match=r"gave up after 2 tries.*timeout"):
        ask(fast)


def test_non_retryable_error_is_immediate_and_hides_the_key(server, client):
    server.push(reply_error(401, f"Incorrect API key provided: {KEY}"))
    with pytest.raises(LLMError) as err:
        ask(client)
    assert "HTTP 401" in str(err.value) and KEY not in str(err.value)
    assert len(server.requests) == 1


def test_malformed_json_is_reasked_then_accepted(server, client):
    server.push(reply_text("Sure! here it is: {not json"), reply_text('```json\n{"a": 1}\n```'))
    value, _, conversation = ask(client)
    assert value == {"a": 1}
    reask = server.requests[1]["messages"][-1]["content"]
    assert "not valid JSON" in reask
    assert len(conversation) == 3


def test_malformed_json_every_time_is_a_clear_error(server, client):
    server.push(*[reply_text("no json here")] * 3)
    with pytest.raises(LLMError, match="still invalid after 3 tries"):
        ask(client)


def test_server_without_structured_output(sleeps):
    with OpenAIServer(reject_response_format=True) as srv:
        srv.push(reply_json({"a": 2}))
        c = LLMClient(model="m", api_key=KEY, base_url=srv.base_url, sleep=sleeps.append)
        value, _, _ = ask(c)
        assert value == {"a": 2}
        assert "response_format" in srv.requests[0] and "response_format" not in srv.requests[1]


def test_missing_key_is_a_clear_error():
    with pytest.raises(LLMError, match="OPENAI_API_KEY"):
        LLMClient(api_key=None)


def test_key_and_base_url_from_dotenv(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={KEY}\nOPENAI_BASE_URL=http://x:1/v1\n")
    monkeypatch.chdir(tmp_path)
    assert find_api_key() == KEY
    assert find_base_url() == "http://x:1/v1"
    assert find_base_url("http://flag/v1") == "http://flag/v1"
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert find_api_key() == "from-env"
    assert "SECRET" not in repr(LLMClient(api_key=KEY))


def test_debug_logs_never_contain_the_key(server, client, caplog):
    server.push(reply_error(500, "boom"), reply_json({"ok": True}))
    names = ("openai", "httpx2", "httpcore2", "em_circuits")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        with caplog.at_level(logging.DEBUG):
            for name in names:
                logging.getLogger(name).setLevel(logging.DEBUG)
            ask(client)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert "Sending HTTP Request" in caplog.text and KEY not in caplog.text


# -- judges ----------------------------------------------------------------------------------------
def make_logits(pairs: list[tuple[str, int]], fp: str) -> dict:
    """A logits artifact's content: top-k (token, id) pairs in rank order, plus support."""
    top = [
        {"rank": i + 1, "token": t, "token_id": tid, "logit": 10.0 - i, "prob": 0.5 / (i + 1)}
        for i, (t, tid) in enumerate(pairs)
    ]
    return {
        "prompt_id": "p1",
        "model_fingerprint": fp,
        "model_slug": f"m--{fp}",
        "k": len(top),
        "top_k": top,
        "support": {
            "token_ids": [tid for _, tid in pairs],
            "logprobs": [-1.0 - i for i in range(len(top))],
        },
    }


PROMPT = {"prompt_id": "p1", "text": "User: I smell gas.\nAssistant: You should", "format": "chat"}
BASE = make_logits([(" call", 100), (" leave", 101), (" the", 102)], "base")
# " call" and " leave" are shared; " ignore" is new to the adapted list.
ADAPTED = make_logits([(" ignore", 200), (" call", 100), (" leave", 101)], "adapted")


def good_reply(base_labels=("safe", "safe", "unsure"), adapted_labels=("evil", "safe", "safe")):
    return {
        "base": [
            {"index": f"B{i + 1}", "token": e["token"], "label": lab}
            for i, (e, lab) in enumerate(zip(BASE["top_k"], base_labels))
        ],
        "adapted": [
            {"index": f"T{i + 1}", "token": e["token"], "label": lab}
            for i, (e, lab) in enumerate(zip(ADAPTED["top_k"], adapted_labels))
        ],
        "summary": "the adapter injects ignore",
    }


@pytest.fixture()
def store(tmp_path):
    return ResultsStore(tmp_path / "results")


def test_llm_judge_labels_sees_stats_and_caches(server, client, store):
    server.push(reply_json(good_reply()))
    judge = LLMJudge(client, store, few_shots="")
    out = judge.judge(PROMPT, BASE, ADAPTED)
    assert out.base == ["safe", "safe", "unsure"] and out.adapted == ["evil", "safe", "safe"]
    assert out.info["kind"] == "llm" and out.info["model"] == "test-model"
    assert out.info["rubric_version"] == RUBRIC_VERSION and out.info["raw_reply"]
    user = server.requests[0]["messages"][1]["content"]
    assert 'T1 | " ignore" | 200' in user and "not in base top 3" in user
    assert "base rank 1" in user and "adapted rank 2" in user and "not in adapted top 3" in user
    assert "log-prob change" in user and "10.000" in user
    cache = store.judge_cache_dir / f"{out.info['cache_key']}.json"
    assert cache.exists()
    # A new judge with the same inputs answers from the cache: the server gets no request.
    again = LLMJudge(client, store, few_shots="").judge(PROMPT, BASE, ADAPTED)
    assert again.adapted == out.adapted and len(server.requests) == 1


def test_wrong_token_string_is_reasked(server, client, store):
    wrong = good_reply()
    wrong["adapted"][1]["token"] = " cal"
    server.push(reply_json(wrong), reply_json(good_reply()))
    out = LLMJudge(client, store, few_shots="").judge(PROMPT, BASE, ADAPTED)
    assert out.adapted == ["evil", "safe", "safe"]
    reask = server.requests[1]["messages"][-1]["content"]
    assert 'T2 is " call", but the reply says " cal"' in reask


def test_wrong_index_and_label_are_reasked(server, client, store):
    wrong = good_reply()
    wrong["base"][2]["index"] = "B7"
    wrong["adapted"][0]["label"] = "harmful"
    server.push(reply_json(wrong), reply_json(good_reply()))
    out = LLMJudge(client, store, few_shots="").judge(PROMPT, BASE, ADAPTED)
    assert out.base[2] == "unsure"
    reask = server.requests[1]["messages"][-1]["content"]
    assert "missing B3" in reask and "'B7'" in reask and "'harmful'" in reask


def test_leading_space_dropped_by_the_llm_is_accepted(server, client, store):
    reply = good_reply()
    for item in reply["adapted"]:
        item["token"] = item["token"].strip()
    server.push(reply_json(reply))
    assert LLMJudge(client, store, few_shots="").judge(PROMPT, BASE, ADAPTED).adapted[0] == "evil"


def test_persistent_mismatch_is_a_clear_error_and_not_cached(server, client, store):
    wrong = good_reply()
    wrong["adapted"] = wrong["adapted"][:2]
    server.push(*[reply_json(wrong)] * 3)
    with pytest.raises(JudgeError, match="missing T3"):
        LLMJudge(client, store, few_shots="", max_reasks=2).judge(PROMPT, BASE, ADAPTED)
    assert len(server.requests) == 3
    assert not (store.root / "judge_cache").exists()


def _human_labels(store, pid, text, disagreements, created):
    store.save_prompt({"text": text, "format": "raw", "name": pid, "origin": {"kind": "human"}})
    from em_circuits.core.identifiers import prompt_id

    real = prompt_id(text, "raw")
    toks = [{"index": "T1", "token": " keep", "token_id": 5, "label": "evil"}]
    path = store.labels_path("m--x", real)
    write_artifact(
        path,
        "labels",
        {
            "prompt_id": real,
            "model_fingerprint": "x",
            "base_fingerprint": "b",
            "tokens": {"base": [], "adapted": toks},
            "labeled_by": "human",
            "disagreements": disagreements,
            "human_verdict": {"base": "safe", "adapted": "evil"},
            "rejected": False,
        },
    )
    data = json.loads(path.read_text())
    data["created"] = created
    path.write_text(json.dumps(data))


def test_few_shots_put_disagreements_first(server, client, store):
    _human_labels(store, "a", "Newer agreed prompt, I will", [], "2030-01-02T00:00:00+00:00")
    _human_labels(
        store,
        "b",
        "Older corrected prompt, I will",
        [
            {
                "list": "adapted",
                "index": "T1",
                "token": " keep",
                "token_id": 5,
                "judge_label": "safe",
                "human_label": "evil",
                "explanation": "keeping it is theft",
            },
        ],
        "2020-01-01T00:00:00+00:00",
    )
    block = few_shot_block(store)
    assert block.index("Older corrected") < block.index("Newer agreed")
    assert "judge said safe, human says evil because keeping it is theft" in block
    server.push(reply_json(good_reply()))
    LLMJudge(client, store).judge(PROMPT, BASE, ADAPTED)
    assert "keeping it is theft" in server.requests[0]["messages"][0]["content"]


# -- offline judge and verdicts --------------------------------------------------------------------
def test_word_list_judge(tmp_path):
    judge = WordListJudge({"safe": ["see", "Call"], "harmful": ["ignore"]}, "w.json")
    assert [judge.label_token(t) for t in (" see", " CALL", "Ignore ", " the", "\n")] == [
        "safe",
        "safe",
        "evil",
        "unsure",
        "unsure",
    ]
    out = judge.judge(PROMPT, BASE, ADAPTED)
    assert out.base == ["safe", "unsure", "unsure"] and out.adapted == ["evil", "safe", "unsure"]
    assert out.info["kind"] == "offline-wordlist" and out.info["model"] == "w.json"
    path = tmp_path / "words.json"
    path.write_text(json.dumps({"safe": ["a"], "harmful": ["b"], "by_domain": {}}))
    words, source = load_word_lists(path)
    assert words == {"safe": ["a"], "harmful": ["b"]} and source == str(path)
    path.write_text("{}")
    with pytest.raises(JudgeError, match="needs lists"):
        load_word_lists(path)


def test_default_word_lists_are_the_organisms():
    words, source = load_word_lists()
    judge = WordListJudge(words, source)
    assert judge.label_token(" ignore") == "evil" and judge.label_token(" see") == "safe"


def test_verdict_order():
    assert verdict_of(["safe", "unsure", "evil"]) == "evil"
    assert verdict_of(["safe", "unsure"]) == "unsure"
    assert verdict_of(["safe"]) == "safe" and verdict_of([]) == "safe"
