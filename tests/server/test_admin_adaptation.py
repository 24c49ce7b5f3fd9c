"""The admin adaptation routes against the fake upstream, with a fake trainer: the admin key,
503 when adaptation is off, job status and progress, the adapters listing, rollback and
validation errors."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.adapt.test_service import FakeTrainer, GateScript, heldout, train_examples
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer

pytestmark = pytest.mark.timeout(60)

ADMIN = {"authorization": "Bearer adm"}
KEYS = {"ka": "tenant-a"}
JOB_KEYS = {"object", "id", "tenant", "base", "status", "stage", "created", "finished", "adapter", "examples",
            "heldout", "score_new", "score_old", "error", "train", "phases_s", "report"}
ADAPTER_KEYS = {"name", "tenant", "base", "version", "path", "status", "parent", "data_hash", "hyper", "score_new",
                "score_old", "created", "promoted_at", "note", "in_flight", "report"}


def body(tenant: str = "tenant-a", n_train: int = 4, n_held: int = 4) -> dict[str, Any]:
    return {"tenant": tenant,
            "examples": [{"task": e.task, "answer": e.answer} for e in train_examples(n_train)],
            "heldout": [{"task": e.task, "answer": e.answer} for e in heldout(n_held)]}


@pytest.fixture
def start(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer], tmp_path: Path
          ) -> Callable[..., tuple[ProxyServer, FakeTrainer]]:
    def make(trainer: FakeTrainer | None = None, **adapt: Any) -> tuple[ProxyServer, FakeTrainer]:
        values = {"enabled": True, "tenants": ["*"], "base_model_path": str(tmp_path), "gate_margin": 0.1, **adapt}
        p = make_proxy(fake_upstream.url, data_dir=str(tmp_path / "data"), admin_key="adm", api_keys=KEYS,
                       adapt=values, memory={"embedder": "hashing", "distill": False})
        t = trainer or FakeTrainer()
        if p.app.services.adapt is not None:
            p.app.services.adapt.trainer = t
        return p, t

    return make


def post(p: ProxyServer, path: str, json: Any = None, headers: dict[str, str] | None = None,
         content: bytes | None = None) -> httpx.Response:
    return httpx.post(p.root + path, json=json, content=content, headers=ADMIN if headers is None else headers,
                      timeout=10)


def get(p: ProxyServer, path: str, headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
    return httpx.get(p.root + path, params=params, headers=ADMIN if headers is None else headers, timeout=10)


def wait_job(p: ProxyServer, job_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = get(p, f"/admin/adaptation/jobs/{job_id}").json()
        if job.get("finished") is not None:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


ROUTES = [("GET", "/admin/adaptation"), ("GET", "/admin/adapters"), ("POST", "/admin/adaptation/run"),
          ("GET", "/admin/adaptation/jobs/x"), ("POST", "/admin/adaptation/jobs/x/cancel"),
          ("POST", "/admin/adapters/rollback")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_admin_key_required(start: Callable[..., tuple[ProxyServer, FakeTrainer]], method: str, path: str) -> None:
    p, _ = start()
    for headers, status in (({}, 401), ({"authorization": "Bearer wrong"}, 401), ({"authorization": "Bearer ka"}, 403)):
        r = httpx.request(method, p.root + path, headers=headers, json={} if method == "POST" else None, timeout=10)
        error(r, status)


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_503_when_adaptation_is_disabled(start: Callable[..., tuple[ProxyServer, FakeTrainer]], method: str,
                                         path: str) -> None:
    p, _ = start(enabled=False)
    assert p.app.services.adapt is None
    r = httpx.request(method, p.root + path, headers=ADMIN, json={} if method == "POST" else None, timeout=10)
    assert error(r, 503)["code"] == "adaptation_disabled"
    # ... and the key is checked first
    error(httpx.request(method, p.root + path, json={} if method == "POST" else None, timeout=10), 401)


def test_status_shape(start: Callable[..., tuple[ProxyServer, FakeTrainer]]) -> None:
    p, _ = start(tenants=["tenant-a"])
    r = get(p, "/admin/adaptation")
    assert r.status_code == 200
    assert r.json() == {"enabled": True, "base": "fake", "tenants": ["tenant-a"], "queue": {}, "running": False,
                        "jobs": 0}


def test_job_status_and_progress(start: Callable[..., tuple[ProxyServer, FakeTrainer]],
                                 fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript(**{"fake-tenant-a-v1": 4}))
    p, trainer = start(FakeTrainer().hold())
    r = post(p, "/admin/adaptation/run", body())
    assert r.status_code == 200, r.text
    started = r.json()
    assert set(started) == {"object", "id", "status"} and started["object"] == "adaptation.job"
    assert started["status"] in ("queued", "running")
    assert trainer.started.wait(10)
    running = get(p, f"/admin/adaptation/jobs/{started['id']}").json()
    assert set(running) == JOB_KEYS
    assert (running["id"], running["tenant"], running["base"]) == (started["id"], "tenant-a", "fake")
    assert (running["status"], running["stage"], running["finished"]) == ("running", "train", None)
    assert (running["examples"], running["heldout"], running["adapter"]) == (4, 4, "fake-tenant-a-v1")
    assert running["train"] == {"status": "training", "step": 1, "total_steps": 3, "loss": 1.25}  # live progress
    assert get(p, "/admin/adaptation").json()["running"] is True
    # one cycle at a time
    busy = post(p, "/admin/adaptation/run", body("other"))
    assert error(busy, 400)["code"] == "adaptation_busy"
    trainer.release.set()
    job = wait_job(p, started["id"])
    assert set(job) == JOB_KEYS
    assert (job["status"], job["stage"], job["error"]) == ("succeeded", "done", None)
    assert (job["score_new"], job["score_old"]) == (1.0, 0.0)
    assert job["train"] == {"status": "done", "step": 3, "total_steps": 3, "loss": 0.5}
    assert job["finished"] >= job["created"]
    # the trainer got the job as the service wrote it: examples file, absolute output folder, hyperparameters
    [tj] = trainer.jobs
    assert Path(tj.out_dir).is_absolute() and tj.out_dir.endswith("fake-tenant-a-v1")
    assert tj.base_model_path == p.settings.adapt.base_model_path
    assert tj.hyper["rank"] == 8 and tj.hyper["target_modules"] == "all-linear"
    assert len(Path(tj.examples).read_text().splitlines()) == 4


def test_adapters_listing_with_scores(start: Callable[..., tuple[ProxyServer, FakeTrainer]],
                                      fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript(**{"fake-tenant-a-v1": 4, "fake-b-v1": 0}))
    p, _ = start()
    assert get(p, "/admin/adapters").json() == {"object": "list", "data": []}
    ok = wait_job(p, post(p, "/admin/adaptation/run", body()).json()["id"])
    rejected = wait_job(p, post(p, "/admin/adaptation/run", body("b")).json()["id"])
    assert (ok["status"], rejected["status"]) == ("succeeded", "rejected")
    listed = get(p, "/admin/adapters").json()
    assert listed["object"] == "list"
    by_name = {v["name"]: v for v in listed["data"]}
    assert set(by_name) == {"fake-tenant-a-v1", "fake-b-v1"}
    a, b = by_name["fake-tenant-a-v1"], by_name["fake-b-v1"]
    assert set(a) == ADAPTER_KEYS
    assert (a["status"], a["score_new"], a["score_old"], a["tenant"], a["base"], a["version"], a["parent"]) == (
        "active", 1.0, 0.0, "tenant-a", "fake", 1, None)
    assert a["promoted_at"] is not None and a["in_flight"] == 0 and len(a["data_hash"]) == 16
    assert a["hyper"]["rank"] == 8
    assert (b["status"], b["score_new"], b["score_old"]) == ("rejected", 0.0, 0.0)
    assert [v["name"] for v in get(p, "/admin/adapters", tenant="b").json()["data"]] == ["fake-b-v1"]
    assert get(p, "/admin/adapters", tenant="nobody").json()["data"] == []


def test_rollback_route(start: Callable[..., tuple[ProxyServer, FakeTrainer]], fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript(**{"fake-tenant-a-v1": 4}))
    p, _ = start()
    assert error(post(p, "/admin/adapters/rollback", {"tenant": "tenant-a"}), 404)["code"] == "not_found"
    assert wait_job(p, post(p, "/admin/adaptation/run", body()).json()["id"])["status"] == "succeeded"
    r = post(p, "/admin/adapters/rollback", {"tenant": "tenant-a"})
    assert r.status_code == 200, r.text
    assert r.json() == {"rolled_back": "fake-tenant-a-v1", "now": "fake", "reason": "by hand"}
    [v] = get(p, "/admin/adapters").json()["data"]
    assert v["status"] == "rolled_back"
    chat = httpx.post(p.url + "/chat/completions", headers={"authorization": "Bearer ka"}, timeout=10,
                      json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["model"] == "fake"


def test_cancel_route(start: Callable[..., tuple[ProxyServer, FakeTrainer]], fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(GateScript())
    p, trainer = start(FakeTrainer().hold())
    job_id = post(p, "/admin/adaptation/run", body()).json()["id"]
    assert trainer.started.wait(10)
    r = post(p, f"/admin/adaptation/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json() == {"id": job_id, "cancelling": True}
    assert wait_job(p, job_id)["status"] == "cancelled"
    assert error(post(p, "/admin/adaptation/jobs/nope/cancel"), 404)["code"] == "not_found"
    assert error(get(p, "/admin/adaptation/jobs/nope"), 404)["code"] == "not_found"


@pytest.mark.parametrize(("payload", "param"), [
    ({"tenant": "a", "bogus": 1}, "bogus"),
    ({"examples": [{"task": "", "answer": "x"}]}, "examples.0.task"),
    ({"examples": [{"task": "q"}]}, "examples.0.answer"),
    ({"examples": [{"task": "q", "answer": "a", "extra": 1}]}, "examples.0.extra"),
    ({"heldout": "not a list"}, "heldout"),
    ({"tenant": 5}, "tenant"),
])
def test_run_validation_errors(start: Callable[..., tuple[ProxyServer, FakeTrainer]], payload: dict[str, Any],
                               param: str) -> None:
    p, trainer = start()
    err = error(post(p, "/admin/adaptation/run", payload), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert get(p, "/admin/adaptation").json()["jobs"] == 0 and not trainer.jobs


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"tenant"'])
def test_run_rejects_bodies_that_are_not_json_objects(start: Callable[..., tuple[ProxyServer, FakeTrainer]],
                                                      raw: bytes) -> None:
    p, _ = start()
    error(post(p, "/admin/adaptation/run", content=raw, headers={**ADMIN, "content-type": "application/json"}), 400)
    error(post(p, "/admin/adapters/rollback", content=raw, headers={**ADMIN, "content-type": "application/json"}),
          400)


def test_run_needs_the_base_weights(start: Callable[..., tuple[ProxyServer, FakeTrainer]]) -> None:
    p, _ = start(base_model_path=None)
    assert error(post(p, "/admin/adaptation/run", body()), 400)["code"] == "adaptation_unavailable"


def test_run_with_too_few_examples_fails_the_job(start: Callable[..., tuple[ProxyServer, FakeTrainer]]) -> None:
    p, trainer = start()
    job = wait_job(p, post(p, "/admin/adaptation/run", {"tenant": "t", "examples": [{"task": "q", "answer": "a"}]}
                           ).json()["id"])
    assert job["status"] == "failed" and "not enough verified examples" in job["error"]
    assert not trainer.jobs


def test_empty_body_runs_for_the_default_tenant(start: Callable[..., tuple[ProxyServer, FakeTrainer]],
                                                fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(lambda b, i: "FINAL VERIFICATION ANSWER: False")  # nothing synthesized is approved
    p, trainer = start()
    r = post(p, "/admin/adaptation/run", content=b"", headers=ADMIN)
    assert r.status_code == 200, r.text
    job = wait_job(p, r.json()["id"])
    assert job["tenant"] == "default" and job["status"] == "failed" and job["examples"] == 0
    assert not trainer.jobs


def test_another_tenants_adapter_is_invisible(start: Callable[..., tuple[ProxyServer, FakeTrainer]],
                                              fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer],
                                              tmp_path: Path) -> None:
    """Tenant A's adapter serves A (routed and by name); B can neither name it nor see it listed."""
    fake_upstream.script(GateScript(**{"fake-tenant-a-v1": 4}))
    p, _ = start(tenants=["tenant-a"])
    p.app.services.auth._keys["kb"] = "tenant-b"  # a second tenant on the same server
    assert wait_job(p, post(p, "/admin/adaptation/run", body()).json()["id"])["status"] == "succeeded"

    def chat(key: str, model: str) -> httpx.Response:
        return httpx.post(p.url + "/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=10,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}]})

    def listed(key: str) -> set[str]:
        r = httpx.get(p.url + "/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
        return {m["id"] for m in r.json()["data"]}

    assert chat("ka", "fake").json()["model"] == "fake-tenant-a-v1"  # routed to A's adapter
    assert chat("ka", "fake-tenant-a-v1").status_code == 200
    assert chat("kb", "fake").json()["model"] == "fake"  # B keeps the base model
    assert error(chat("kb", "fake-tenant-a-v1"), 404)["code"] == "model_not_found"
    assert "fake-tenant-a-v1" in listed("ka")
    assert not any(m.startswith("fake-tenant-a-v1") for m in listed("kb"))
    # nor as the model a strategy's own calls go to (verifier, critic): 404, and no call reaches it
    fake_upstream.clear()
    for key, strategy in (("verifier_model", "best_of_n"), ("critic_model", "critique_refine")):
        r = httpx.post(p.url + "/chat/completions", headers={"authorization": "Bearer kb"}, timeout=10,
                       json={"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                             "strategy": {"name": strategy, key: "fake-tenant-a-v1"}})
        assert error(r, 404)["code"] == "model_not_found", r.text
    assert not any(c.json.get("model") == "fake-tenant-a-v1" for c in fake_upstream.completion_calls())


def test_with_scope_near_only_questions_near_the_adapters_reach_it(
        start: Callable[..., tuple[ProxyServer, FakeTrainer]], fake_upstream: FakeUpstream) -> None:
    """adapt.scope: near (server/routing.py, adapt/scope.py): the tenant's question near the
    adapter's training questions goes to the adapter, a far one to the base model; the trace says
    which and how near; a tenant without an adapter embeds nothing."""
    fake_upstream.script(GateScript(**{"fake-tenant-a-v1": 4}))
    p, _ = start(scope="near", scope_similarity=0.5)
    assert wait_job(p, post(p, "/admin/adaptation/run", body()).json()["id"])["status"] == "succeeded"
    assert get(p, "/admin/adapters").json()["data"][0]["report"]["scope"]["questions"] == 8

    def chat(question: str) -> dict[str, Any]:
        r = httpx.post(p.url + "/chat/completions", headers={"authorization": "Bearer ka"}, timeout=10,
                       json={"model": "fake", "messages": [{"role": "user", "content": question}], "trace": True})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    near = chat("Zorblat question 2?")
    assert near["model"] == "fake-tenant-a-v1"
    assert near["sharpen"]["trace"]["adapter_scope"]["answered_by"] == "adapter"
    far = chat("Translate the French sentence 'le chat dort' into German, please.")
    assert far["model"] == "fake"
    scope = far["sharpen"]["trace"]["adapter_scope"]
    assert scope["answered_by"] == "base" and scope["similarity"] < scope["threshold"] == 0.5
    sent = [c.json["model"] for c in fake_upstream.completion_calls()][-2:]
    assert sent == ["fake-tenant-a-v1", "fake"]  # what went upstream, not only what was reported
    metrics = httpx.get(p.root + "/metrics", headers=ADMIN, timeout=10).text
    assert 'sharpen_adapter_scope_total{answered_by="adapter"} 1.0' in metrics
    assert 'sharpen_adapter_scope_total{answered_by="base"} 1.0' in metrics
