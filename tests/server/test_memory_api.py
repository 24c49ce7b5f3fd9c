"""Experience memory through the proxy: recall injection, what gets remembered, tenant isolation,
POST /v1/feedback and the admin memory routes, against the fake upstream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.upstream import FakeUpstream, RecordedRequest
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(60)

KEYS = {"ka": "tenant-a", "kb": "tenant-b"}
ADMIN = {"authorization": "Bearer adm"}
SECRET_Q = "What is the zorblat code of the Nightingale project?"
SECRET_A = "ZB-7431-NIGHT"
SC4 = {"name": "self_consistency", "n": 4}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def start(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer], tmp_path: Path
          ) -> Callable[..., ProxyServer]:
    """sharpen with memory on (hashing embedder, no distillation unless asked), two tenants and an admin key."""
    n = [0]

    def make(data_dir: Path | None = None, **memory: Any) -> ProxyServer:
        n[0] += 1
        mem = {"embedder": "hashing", "persist_interval_s": 0.2, "distill": False, **memory}
        p = make_proxy(fake_upstream.url, data_dir=str(data_dir or tmp_path / f"data{n[0]}"), memory=mem,
                       api_keys=KEYS, admin_key="adm")
        if mem.get("enabled", True):
            wait(lambda: httpx.get(p.root + "/admin/memory/stats", headers=ADMIN).json().get("ready"))
        return p

    return make


def wait(pred: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def chat(p: ProxyServer, key: str, content: str, *, status: int = 200, system: str | None = None,
         **extra: Any) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    r = httpx.post(p.url + "/chat/completions", headers=auth(key), timeout=20,
                   json={"model": "fake", "messages": messages, **extra})
    assert r.status_code == status, r.text
    out: dict[str, Any] = r.json()
    return out


def entries(p: ProxyServer, tenant: str | None = None, **params: Any) -> list[dict[str, Any]]:
    q = {**({"tenant": tenant} if tenant else {}), **params}
    r = httpx.get(p.root + "/admin/memory", headers=ADMIN, params=q)
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def settle(p: ProxyServer) -> None:
    """Every finished request's event handled and its experience committed."""
    svc = p.app.services
    loop = svc.memory._tasks[0].get_loop()  # type: ignore[union-attr]

    async def both() -> None:
        await asyncio.sleep(0.05)  # the event is published after the response is sent
        await svc.recorder.drain()  # type: ignore[union-attr]
        await svc.memory.flush()  # type: ignore[union-attr]

    asyncio.run_coroutine_threadsafe(both(), loop).result(timeout=15)


def import_lines(p: ProxyServer, rows: list[dict[str, Any]], status: int = 200) -> dict[str, Any]:
    body = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    r = httpx.post(p.root + "/admin/memory/import", headers=ADMIN, content=body, timeout=20)
    assert r.status_code == status, r.text
    out: dict[str, Any] = r.json()
    return out


def seed(p: ProxyServer, tenant: str = "tenant-a", task: str = SECRET_Q, answer: str = SECRET_A,
         **kw: Any) -> str:
    assert import_lines(p, [{"tenant": tenant, "task": task, "answer": answer, "score": 0.9, **kw}])["imported"] == 1
    rows = entries(p, tenant, q=task, limit=1)
    uid: str = rows[0]["id"]
    return uid


def last_call(fake: FakeUpstream) -> RecordedRequest:
    calls = fake.completion_calls()
    assert calls
    return calls[-1]


def system_text(rec: RecordedRequest) -> str:
    msgs = rec.json["messages"]
    return str(msgs[0]["content"]) if msgs[0]["role"] == "system" else ""


# ------------------------------------------------------------------------------------------- recall


def test_recall_injects_only_when_asked(fake_upstream: FakeUpstream, start: Callable[..., ProxyServer]) -> None:
    p = start()
    uid = seed(p)
    plain = chat(p, "ka", SECRET_Q)
    rec = last_call(fake_upstream)
    assert rec.json["messages"] == [{"role": "user", "content": SECRET_Q}]  # server default: no recall
    assert "sharpen" not in plain and "memory" not in rec.json

    resp = chat(p, "ka", SECRET_Q, memory={"recall": True})
    rec = last_call(fake_upstream)
    assert len(rec.json["messages"]) == 2 and rec.json["messages"][1] == {"role": "user", "content": SECRET_Q}
    section = system_text(rec)
    assert section.startswith("Relevant past experience")
    assert f"Task: {SECRET_Q}" in section and f"Answer that worked: {SECRET_A}" in section
    assert "memory" not in rec.json  # sharpen's own field is never forwarded
    assert resp["sharpen"]["memory"] == [uid]

    # With the trace: what was used, how similar, and what kind.
    resp = chat(p, "ka", SECRET_Q, memory={"recall": True, "k": 2}, trace=True)
    used = resp["sharpen"]["trace"]["memory"]
    assert [(u["id"], u["kind"]) for u in used] == [(uid, "success")] and used[0]["similarity"] > 0.99

    # An existing system message gets the section appended, not a second system message.
    chat(p, "ka", SECRET_Q, system="You are terse.", memory=True)
    msgs = last_call(fake_upstream).json["messages"]
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"].startswith("You are terse.\n\nRelevant past experience")

    # Nothing similar enough: nothing injected, and the answer says no memory was used.
    resp = chat(p, "ka", "Bake bread with yeast and flour", memory={"recall": True})
    assert system_text(last_call(fake_upstream)) == "" and resp["sharpen"]["memory"] == []


def test_pitfalls_are_labelled(fake_upstream: FakeUpstream, start: Callable[..., ProxyServer]) -> None:
    p = start()
    seed(p, kind="pitfall", answer="ZB-0000", score=0.1)
    chat(p, "ka", SECRET_Q, memory={"recall": True})
    assert "Pitfall (this failed): ZB-0000" in system_text(last_call(fake_upstream))


def test_bad_memory_option_is_400(start: Callable[..., ProxyServer]) -> None:
    p = start()
    for bad in ({"recall": "maybe"}, {"k": 0}, {"k": 33}, {"forget": True}, "maybe", 5):
        r = httpx.post(p.url + "/chat/completions", headers=auth("ka"),
                       json={"model": "fake", "messages": [{"role": "user", "content": "x"}], "memory": bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_server_default_recall_and_opt_out(fake_upstream: FakeUpstream, start: Callable[..., ProxyServer]) -> None:
    p = start(recall=True)
    seed(p)
    resp = chat(p, "ka", SECRET_Q)  # the server recalls by default
    assert SECRET_A in system_text(last_call(fake_upstream)) and len(resp["sharpen"]["memory"]) == 1

    # memory: false: no recall, and nothing remembered even with a clear success signal.
    fake_upstream.answers = ["9"]
    before = len(entries(p, "tenant-a"))
    resp = chat(p, "ka", "What is 4 + 5, privately?", memory=False, strategy=SC4)
    assert system_text(last_call(fake_upstream)) == "" and "memory" not in resp["sharpen"]
    settle(p)
    assert len(entries(p, "tenant-a")) == before
    # remember only: no recall.
    chat(p, "ka", "What is 4 + 5, now remembered?", memory={"recall": False, "remember": True}, strategy=SC4)
    assert system_text(last_call(fake_upstream)) == ""
    settle(p)
    assert entries(p, "tenant-a")[0]["task"] == "What is 4 + 5, now remembered?"  # newest first


# ---------------------------------------------------------------------------------------- remember


def test_strategy_successes_and_pitfalls_are_remembered(fake_upstream: FakeUpstream,
                                                        start: Callable[..., ProxyServer]) -> None:
    p = start()
    fake_upstream.answers = ["7"]  # unanimous: confidence 1
    chat(p, "ka", "What is 3 + 4?", strategy=SC4)
    fake_upstream.answers = ["1", "2", "3", "5"]  # a quarter agree: a clear failure
    chat(p, "ka", "What is 17 * 23?", strategy=SC4)
    fake_upstream.answers = ["8", "8", "3", "5"]  # half: neither
    chat(p, "ka", "What is 2 ** 3?", strategy=SC4)
    chat(p, "ka", "What is the passthrough answer?")  # no success signal at all
    settle(p)
    got = {e["task"]: e for e in entries(p, "tenant-a")}
    assert set(got) == {"What is 3 + 4?", "What is 17 * 23?"}
    ok, bad = got["What is 3 + 4?"], got["What is 17 * 23?"]
    assert (ok["kind"], ok["score"], ok["source"]) == ("success", 1.0, "strategy")
    assert ok["answer"].endswith("The answer is 7.")
    assert (bad["kind"], bad["score"]) == ("pitfall", 0.25)
    assert entries(p, "tenant-b") == []

    # The next time the task comes, recall replays it and the answer names the memory used.
    resp = chat(p, "ka", "What is 3 + 4?", memory={"recall": True}, strategy=SC4)
    assert resp["sharpen"]["memory"][0] == ok["id"]
    assert "The answer is 7." in system_text(last_call(fake_upstream))
    settle(p)
    assert len([e for e in entries(p, "tenant-a") if e["task"] == "What is 3 + 4?"]) == 1  # not stored twice


def test_distilled_insights_are_stored_and_replayed(fake_upstream: FakeUpstream,
                                                     start: Callable[..., ProxyServer]) -> None:
    def script(body: dict[str, Any], i: int) -> str:
        text = json.dumps(body["messages"])
        if "Distil reusable experience" in text:
            return "INSIGHTS: multiply tens first\nWORKFLOW: 1. split {x} into tens and units"
        return "The answer is 391."

    fake_upstream.script(script)
    p = start(distill=True)
    chat(p, "ka", "What is 17 * 23?", strategy=SC4)
    settle(p)
    row = wait(lambda: [e for e in entries(p, "tenant-a") if e["insights"]])[0]
    assert row["insights"] == "multiply tens first" and row["workflow"] == "1. split {x} into tens and units"
    distil = [c for c in fake_upstream.completion_calls() if "Distil" in json.dumps(c.json)]
    assert len(distil) == 1 and distil[0].json["model"] == "fake"
    chat(p, "ka", "What is 17 * 23?", memory={"recall": True})
    section = system_text(last_call(fake_upstream))
    assert "Insights: multiply tens first" in section and "Workflow: 1. split {x}" in section


def test_tenant_isolation_is_adversarial_proof(fake_upstream: FakeUpstream,
                                               start: Callable[..., ProxyServer]) -> None:
    p = start(recall=True)
    fake_upstream.answers = ["7431"]
    chat(p, "ka", SECRET_Q, strategy=SC4)  # tenant A learns the secret
    seed(p, task=SECRET_Q.replace("Nightingale", "Falcon"))
    settle(p)
    assert len(entries(p, "tenant-a")) == 2
    fake_upstream.clear()
    fake_upstream.answers = ["0"]
    # Tenant B asks exactly A's question, in every way it can.
    for extra in ({}, {"memory": True}, {"memory": {"recall": True, "k": 32}}, {"strategy": SC4, "trace": True}):
        resp = chat(p, "kb", SECRET_Q, **extra)
        rec = last_call(fake_upstream)
        body = json.dumps(rec.json)
        assert "7431" not in body and SECRET_A not in body and "Relevant past experience" not in body
        assert resp["sharpen"]["memory"] == []
        assert "7431" not in json.dumps(resp) and SECRET_A not in json.dumps(resp)
    settle(p)
    # B's own memory holds only B's answer; A's is untouched.
    assert {e["tenant"] for e in entries(p, "tenant-b")} == {"tenant-b"}
    assert all("7431" not in e["answer"] for e in entries(p, "tenant-b"))
    assert [e["tenant"] for e in entries(p, "tenant-b", q=SECRET_Q, limit=100)] == ["tenant-b"]
    assert len(entries(p, "tenant-a")) == 2


# ---------------------------------------------------------------------------------------- feedback


def feedback(p: ProxyServer, key: str, body: Any) -> httpx.Response:
    return httpx.post(p.url + "/feedback", headers=auth(key), content=orjson.dumps(body)
                      if not isinstance(body, bytes) else body, timeout=20)


def test_feedback_on_a_passthrough_answer(fake_upstream: FakeUpstream, start: Callable[..., ProxyServer]) -> None:
    p = start()
    good = chat(p, "ka", "Name a prime above 10")
    bad = chat(p, "ka", "Name an even prime above 10")
    settle(p)
    r = feedback(p, "ka", {"id": good["id"], "score": 0.9})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "feedback" and out["id"] == good["id"] and out["stored"] and out["kind"] == "success"
    r = feedback(p, "ka", {"id": bad["id"], "score": 0.05})
    assert r.status_code == 200 and r.json()["kind"] == "pitfall"
    got = {e["task"]: e for e in entries(p, "tenant-a")}
    e = got["Name a prime above 10"]
    assert (e["score"], e["kind"], e["source"], e["id"]) == (0.9, "success", "feedback", out["experience_id"])
    assert e["answer"] == good["choices"][0]["message"]["content"]
    assert got["Name an even prime above 10"]["kind"] == "pitfall"

    # Another tenant's response id is as unknown as a made-up one.
    for key, rid in (("kb", good["id"]), ("ka", "chatcmpl-nope")):
        r = feedback(p, key, {"id": rid, "score": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
    assert entries(p, "tenant-b") == []
    # Bad bodies.
    for body in ({"id": good["id"], "score": 1.5}, {"id": good["id"], "score": -0.1}, {"id": good["id"]},
                 {"id": "", "score": 0.5}, {"id": good["id"], "score": 0.5, "extra": 1}, [1], b"{nope"):
        assert feedback(p, "ka", body).status_code == 400, body
    assert feedback(p, "bad-key", {"id": good["id"], "score": 1}).status_code == 401


# ------------------------------------------------------------------------------------------- admin


def test_admin_routes_need_the_admin_key(start: Callable[..., ProxyServer]) -> None:
    p = start()
    routes = [("GET", "/admin/memory/stats"), ("GET", "/admin/memory"), ("GET", "/admin/memory/export"),
              ("DELETE", "/admin/memory/abc"), ("DELETE", "/admin/memory?tenant=tenant-a"),
              ("POST", "/admin/memory/import")]
    for method, path in routes:
        r = httpx.request(method, p.root + path, headers=auth("ka"), content=b"")
        assert r.status_code == 403, (method, path, r.text)
        assert httpx.request(method, p.root + path, content=b"").status_code == 401


def test_admin_stats_list_search_delete(fake_upstream: FakeUpstream, start: Callable[..., ProxyServer]) -> None:
    p = start()
    tasks = ["What is the zorblat code of apple?", "What is the zorblat code of pear?", "How do I bake bread?"]
    rows = [{"tenant": "tenant-a", "task": t, "answer": f"answer {i}", "score": 0.5 + i / 10}
            for i, t in enumerate(tasks)]
    rows.append({"tenant": "tenant-b", "task": tasks[0], "answer": "b's answer", "score": 0.7, "kind": "pitfall",
                 "insights": "ins", "workflow": "wf"})
    assert import_lines(p, rows) == {"imported": 4, "inserted": 4, "merged": 0, "duplicates": 0, "duplicate_lines": []}

    stats = httpx.get(p.root + "/admin/memory/stats", headers=ADMIN).json()
    assert stats["ready"] and stats["entries"] == 4 and stats["tenants"] == {"tenant-a": 3, "tenant-b": 1}
    assert stats["embedder"] == "hashing" and stats["dropped"] == 0

    assert [e["task"] for e in entries(p, "tenant-a")] == tasks[::-1]  # newest first
    assert len(entries(p)) == 4 and len(entries(p, limit=1)) == 1 and len(entries(p, offset=3)) == 1
    b = entries(p, "tenant-b")[0]
    assert (b["kind"], b["insights"], b["workflow"], b["source"]) == ("pitfall", "ins", "wf", "import")

    found = entries(p, "tenant-a", q="zorblat code of apple")
    assert found[0]["task"] == tasks[0] and found[0]["similarity"] > found[-1]["similarity"]
    assert {e["tenant"] for e in found} == {"tenant-a"}
    assert httpx.get(p.root + "/admin/memory", headers=ADMIN, params={"q": "x"}).status_code == 400

    uid = found[0]["id"]
    r = httpx.delete(p.root + f"/admin/memory/{uid}", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"id": uid, "deleted": True}
    assert httpx.delete(p.root + f"/admin/memory/{uid}", headers=ADMIN).status_code == 404
    assert all(e["id"] != uid for e in entries(p, "tenant-a", q=tasks[0]))
    chat(p, "ka", tasks[0], memory={"recall": True})
    assert "answer 0" not in system_text(last_call(fake_upstream))

    r = httpx.delete(p.root + "/admin/memory", headers=ADMIN, params={"tenant": "tenant-a"})
    assert r.status_code == 200 and r.json() == {"tenant": "tenant-a", "deleted": 2}
    assert entries(p, "tenant-a") == [] and entries(p, "tenant-a", q=tasks[1]) == []
    assert len(entries(p, "tenant-b")) == 1
    assert httpx.get(p.root + "/admin/memory/stats", headers=ADMIN).json()["tenants"] == {"tenant-b": 1}


def test_import_rejects_bad_lines(start: Callable[..., ProxyServer]) -> None:
    p = start()
    good = {"tenant": "t", "task": "q", "answer": "a", "score": 0.5}
    for bad in ({"tenant": "t", "task": "q", "answer": "a"}, {**good, "score": 2}, {**good, "task": ""},
                {**good, "score": "high"}, {**good, "task": 12}, {**good, "kind": "meh"}, [1, 2]):
        body = orjson.dumps(good) + b"\n" + orjson.dumps(bad) + b"\n"
        r = httpx.post(p.root + "/admin/memory/import", headers=ADMIN, content=body)
        assert r.status_code == 400, (bad, r.text)
        assert "line 2" in r.json()["error"]["message"]
    r = httpx.post(p.root + "/admin/memory/import", headers=ADMIN, content=b"{not json\n")
    assert r.status_code == 400
    assert entries(p) == []  # a bad line rejects the whole import
    # A numeric string is a number; the row is stored as a float and merges like any other.
    assert import_lines(p, [{**good, "score": "0.25"}])["imported"] == 1
    assert import_lines(p, [{**good, "task": "q!", "answer": "better", "score": 0.75}])["imported"] == 1
    [row] = entries(p, "t")
    assert (row["answer"], row["score"]) == ("better", 0.75)


def test_export_then_import_into_a_fresh_server(start: Callable[..., ProxyServer], tmp_path: Path) -> None:
    p = start()
    rows = [{"tenant": "tenant-a", "task": f"zorblat code of item {i} in shelf {i * 7 % 11}", "answer": f"ZB-{i}",
             "score": 0.6 + i / 100, "kind": "success" if i % 3 else "pitfall", "insights": f"ins {i}",
             "workflow": f"wf {i}"} for i in range(20)]
    rows += [{"tenant": "tenant-b", "task": "b's own task", "answer": "b", "score": 1.0}]
    assert import_lines(p, rows)["imported"] == 21
    r = httpx.get(p.root + "/admin/memory/export", headers=ADMIN)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [orjson.loads(x) for x in r.content.splitlines()]
    assert len(lines) == 21
    only_b = httpx.get(p.root + "/admin/memory/export", headers=ADMIN, params={"tenant": "tenant-b"})
    assert [orjson.loads(x)["task"] for x in only_b.content.splitlines()] == ["b's own task"]

    fresh = start(data_dir=tmp_path / "fresh")
    assert entries(fresh) == []
    out = import_lines(fresh, lines)
    assert out == {"imported": 21, "inserted": 21, "merged": 0, "duplicates": 0, "duplicate_lines": []}
    keep = ("tenant", "task", "answer", "score", "kind", "insights", "workflow")

    def content(px: ProxyServer) -> list[tuple[Any, ...]]:
        return sorted(tuple(e[k] for k in keep) for e in entries(px, limit=1000))

    assert content(fresh) == content(p)
    # And it is searchable there, per tenant.
    hit = entries(fresh, "tenant-a", q="zorblat code of item 13 in shelf 3")[0]
    assert hit["answer"] == "ZB-13"


def test_memory_persists_across_restarts(start: Callable[..., ProxyServer], tmp_path: Path) -> None:
    d = tmp_path / "persist"
    p = start(data_dir=d)
    seed(p)
    p.stop()
    again = start(data_dir=d)
    assert [e["answer"] for e in entries(again, "tenant-a", q=SECRET_Q)] == [SECRET_A]
    assert httpx.get(again.root + "/admin/memory/stats", headers=ADMIN).json()["repaired_at_start"] == []


# ------------------------------------------------------------------------------------ memory disabled


def test_memory_disabled(fake_upstream: FakeUpstream, start: Callable[..., ProxyServer]) -> None:
    p = start(enabled=False)
    assert p.app.services.memory is None
    chat(p, "ka", "hello")  # plain requests are unaffected
    chat(p, "ka", "hello", memory=False)
    for method, path in (("GET", "/admin/memory/stats"), ("GET", "/admin/memory"), ("GET", "/admin/memory/export"),
                         ("DELETE", "/admin/memory/x"), ("POST", "/admin/memory/import")):
        r = httpx.request(method, p.root + path, headers=ADMIN, content=b"")
        assert r.status_code == 503 and r.json()["error"]["code"] == "memory_disabled", (method, path)
        assert httpx.request(method, p.root + path, headers=auth("ka"), content=b"").status_code == 403
    assert feedback(p, "ka", {"id": "x", "score": 1}).status_code == 400


def test_asking_for_memory_when_disabled_is_400(start: Callable[..., ProxyServer]) -> None:
    p = start(enabled=False)
    for asked in (True, {"recall": True}, {"remember": True}):
        r = httpx.post(p.url + "/chat/completions", headers=auth("ka"),
                       json={"model": "fake", "messages": [{"role": "user", "content": "x"}], "memory": asked})
        assert r.status_code == 400, (asked, r.text)
        assert r.json()["error"]["param"] == "memory"


def test_repeated_tasks_leave_no_distillation_state(fake_upstream: FakeUpstream,
                                                    start: Callable[..., ProxyServer]) -> None:
    p = start(distill=True)
    fake_upstream.answers = ["7"]
    for _ in range(3):  # the first is stored and distilled; the others merge into it
        chat(p, "ka", "What is 3 + 4?", strategy=SC4)
    settle(p)
    assert len(entries(p, "tenant-a")) == 1
    assert p.app.services.recorder.model_of == {}  # type: ignore[union-attr]
