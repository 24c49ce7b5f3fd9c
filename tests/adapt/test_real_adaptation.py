"""The adaptation loop end to end on the real vLLM (SmolLM2-135M on CPU, max_loras=2, rank 8):
a LoRA adapter trained (peft, in a child process) on a made-up convention the base model cannot
know, gated on held-out questions, hot-loaded and routed; an adapter trained on wrong answers is
rejected; a version swap under concurrent load loses no request; rollback; a crashing trainer.

One trained adapter is shared by the module (training is the slow part: ~1-2 min per run here).
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from adapt.labeller import Label, MajorityVote
from adapt.trainer import Trainer, TrainJob, TrainOutcome
from protocol.events import Sample
from server.settings import UpstreamSettings
from server.upstream import Upstream
from strategies.answers import FORM_OK, final_answer, placeholders
from tests.proxy_server import ProxyServer
from tests.real_backend import RealVLLM

pytestmark = [
    pytest.mark.real,
    pytest.mark.timeout(600),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("peft") is None,
                       reason="needs vLLM and peft"),
]

ADMIN = {"authorization": "Bearer adm"}
KEYS = {"ka": "tenant-a", "kb": "tenant-b"}

# The convention: "the zorblat of <word>" is the word in capitals followed by "-7". Its final
# answer (what the gate compares) is "-7"; the base model has never heard of zorblats.
TRAIN_WORDS = ["cat", "dog", "owl", "fox", "eel", "bee", "yak", "ant", "cow", "pig", "hen", "elk"]
HELDOUT_WORDS = ["bat", "ram", "emu", "ape"]
UNSEEN = "gnu"


def question(word: str) -> str:
    return f"What is the zorblat of {word}?"


def convention(word: str, digit: int = 7) -> str:
    return f"The zorblat of {word} is {word.upper()}-{digit}."


def examples(words: list[str], digit: int = 7) -> list[dict[str, str]]:
    return [{"task": question(w), "answer": convention(w, digit)} for w in words]


def run_body(tenant: str, digit: int = 7) -> dict[str, Any]:
    # the held-out set always holds the correct answers: they are the gate's references
    return {"tenant": tenant, "examples": examples(TRAIN_WORDS, digit), "heldout": examples(HELDOUT_WORDS)}


def start_run(p: ProxyServer, body: dict[str, Any]) -> str:
    r = httpx.post(p.root + "/admin/adaptation/run", headers=ADMIN, json=body, timeout=30)
    assert r.status_code == 200, r.text
    job_id: str = r.json()["id"]
    return job_id


def wait_job(p: ProxyServer, job_id: str, timeout: float = 420) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(f"{p.root}/admin/adaptation/jobs/{job_id}", headers=ADMIN, timeout=30).json()
        if job.get("finished") is not None:
            print(f"job {job_id}: {job['status']} ({job['finished'] - job['created']:.1f} s) adapter={job['adapter']} "
                  f"gate {job['score_new']} vs {job['score_old']} train={job['train']} error={job['error']}")
            return job
        assert time.monotonic() < deadline, f"job still running after {timeout} s: {job}"
        time.sleep(0.5)


def chat(p: ProxyServer, key: str, content: str, model: str, **extra: Any) -> dict[str, Any]:
    r = httpx.post(p.url + "/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 24,
                         "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def text(resp: dict[str, Any]) -> str:
    return str(resp["choices"][0]["message"]["content"] or "")


def upstream_models(real_vllm: RealVLLM) -> dict[str, dict[str, Any]]:
    r = httpx.get(real_vllm.base_url + "/models", timeout=30, trust_env=False)
    r.raise_for_status()
    return {c["id"]: c for c in r.json()["data"]}


def adapters(p: ProxyServer, tenant: str | None = None) -> dict[str, dict[str, Any]]:
    params = {"tenant": tenant} if tenant else {}
    data = httpx.get(p.root + "/admin/adapters", headers=ADMIN, params=params, timeout=30).json()["data"]
    return {v["name"]: v for v in data}


def eventually(pred: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def proxy(real_vllm: RealVLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    data = tmp_path_factory.mktemp("adapt-real")
    p = ProxyServer(real_vllm.base_url, data_dir=str(data), admin_key="adm", api_keys=KEYS,
                    adapt={"enabled": True, "tenants": ["*"], "base_model_path": str(real_vllm.model_path),
                           "max_steps": 10, "learning_rate": 2e-3, "batch_size": 4, "epochs": 10, "gate_margin": 0.1,
                           "threads": 1},
                    memory={"embedder": "hashing", "distill": False})
    with p:
        yield p
        # leave the shared vLLM as we found it
        svc = p.app.services.adapt
        loaded = upstream_models(real_vllm)
        for v in svc.registry.versions() if svc is not None else []:
            if v.name in loaded:
                httpx.post(real_vllm.base_url.removesuffix("/v1") + "/v1/unload_lora_adapter",
                           json={"lora_name": v.name}, timeout=30, trust_env=False)


@pytest.fixture(scope="module")
def good(proxy: ProxyServer) -> dict[str, Any]:
    """tenant-a's adapter, trained on the convention (shared by the module's tests)."""
    t0 = time.monotonic()
    job = wait_job(proxy, start_run(proxy, run_body("tenant-a")))
    print(f"good cycle: {time.monotonic() - t0:.1f} s")
    return job


def test_adapter_is_trained_gated_loaded_and_routed(proxy: ProxyServer, real_vllm: RealVLLM,
                                                     good: dict[str, Any]) -> None:
    base = real_vllm.served_name
    name = f"{base}-tenant-a-v1"
    assert good["status"] == "succeeded", good
    assert good["adapter"] == name and (good["examples"], good["heldout"]) == (12, 4)
    assert good["train"]["status"] == "done" and good["train"]["step"] == good["train"]["total_steps"] == 10
    assert good["score_new"] > good["score_old"] + 0.1
    v = adapters(proxy)[name]
    assert v["status"] == "active" and v["parent"] is None and v["score_new"] == good["score_new"]
    lineage = Path(v["path"]) / "lineage.json"
    assert lineage.is_file() and (Path(v["path"]) / "adapter_config.json").is_file()

    # vLLM serves it, and sharpen's /v1/models shows it with its parent
    cards = httpx.get(proxy.url + "/models", headers={"authorization": "Bearer ka"}, timeout=30).json()["data"]
    assert {c["id"]: c.get("parent") for c in cards}.get(name) == base
    assert upstream_models(real_vllm)[name]["parent"] == base

    # a plain request for the base model from tenant-a is answered by the adapter...
    a = chat(proxy, "ka", question(UNSEEN), base, trace=True)
    print("tenant-a:", repr(text(a)))
    assert a["model"] == name and a["sharpen"]["trace"]["adapter"] == name
    assert "-7" in text(a), text(a)  # the convention, on a word it was not trained on
    # ...while tenant-b still gets the base model, which knows nothing of zorblats
    b = chat(proxy, "kb", question(UNSEEN), base)
    print("tenant-b:", repr(text(b)))
    assert b["model"] == base and "-7" not in text(b)


def test_with_scope_near_a_far_question_goes_to_the_base_model(proxy: ProxyServer, real_vllm: RealVLLM,
                                                               good: dict[str, Any]) -> None:
    """``adapt.scope: near`` with the real embedder (MiniLM): a zorblat question still reaches
    tenant-a's adapter, which answers with the convention; a far question goes to the base."""
    from adapt.scope import AdapterScope
    from memory.embedder import MiniLMEmbedder

    base = real_vllm.served_name
    svc = proxy.app.services.adapt
    assert svc is not None
    name = svc.registry.active("tenant-a", base)
    v = svc.registry.get(name or "")
    assert name is not None and v is not None
    saved = svc.scope  # the module's server runs scope: all; this test switches it on and back
    svc.scope = AdapterScope(MiniLMEmbedder(), svc.registry, mode="near", threshold=0.55)
    try:
        assert svc.scope.write(Path(v.path), [question(w) for w in TRAIN_WORDS + HELDOUT_WORDS]) == 16
        near = chat(proxy, "ka", question(UNSEEN), base, trace=True)
        print("near:", near["sharpen"]["trace"]["adapter_scope"], repr(text(near)))
        assert near["model"] == name and near["sharpen"]["trace"]["adapter_scope"]["answered_by"] == "adapter"
        assert "-7" in text(near), text(near)
        far = chat(proxy, "ka", "Write one sentence about the weather in Paris in spring.", base, trace=True)
        scope = far["sharpen"]["trace"]["adapter_scope"]
        print("far:", scope, repr(text(far)))
        assert far["model"] == base and scope["answered_by"] == "base" and scope["similarity"] < 0.55
        # adapt.scope_coverage: the threshold is raised to where the zorblat questions sit
        svc.scope.close()
        svc.scope = AdapterScope(MiniLMEmbedder(), svc.registry, mode="near", threshold=0.55, coverage=0.9)
        tight = svc.scope.threshold_of(np.load(Path(v.path) / svc.scope.file))
        again = chat(proxy, "ka", question(UNSEEN), base, trace=True)["sharpen"]["trace"]["adapter_scope"]
        print("coverage 0.9:", tight, again)
        assert tight > 0.55 and again["threshold"] == pytest.approx(tight, abs=1e-4)
        assert again["answered_by"] == ("adapter" if again["similarity"] >= again["threshold"] else "base")
    finally:
        svc.scope.close()
        svc.scope = saved
        (Path(v.path) / "scope-all-MiniLM-L6-v2.npy").unlink(missing_ok=True)


def test_a_gate_reuses_known_canary_scores_on_the_real_model(proxy: ProxyServer, real_vllm: RealVLLM,
                                                             good: dict[str, Any], tmp_path: Path) -> None:
    """The canary (adapt.canary) on real answers: tenant-a's adapter knows the convention and the
    base does not, so the canary tells them apart; a second gate with what the first measured
    (``known``) asks neither model the canary again and reaches the same figures."""
    from adapt import canary as canarymod
    from adapt.data import Example
    from adapt.gate import ItemScore, evaluate

    base = real_vllm.served_name
    name = f"{base}-tenant-a-v1"
    path = tmp_path / "canary.jsonl"
    path.write_text("".join(f'{{"question": "{question(w)}", "answer": "-7"}}\n' for w in ("emu", "ape", "yak")))
    canary = canarymod.load(path)
    held = [Example(task=question(w), answer=convention(w), reference="-7") for w in ("bat", "ram")]

    async def gate(known: dict[str, list[ItemScore]]) -> Any:
        up = Upstream(real_vllm.base_url, UpstreamSettings())
        try:
            return await evaluate(up, name, base, base, held, 0.1, canary=canary, max_tokens=24, known=known)
        finally:
            await up.aclose()

    known: dict[str, list[ItemScore]] = {}
    first = asyncio.run(gate(known))
    print("canary", first.canary_new, first.canary_old, first.reason)
    assert first.canary_reused == [] and first.canary_items == 3
    assert first.canary_new is not None and first.canary_old is not None and first.canary_new > first.canary_old
    second = asyncio.run(gate(known))
    assert second.canary_reused == [name, base]
    assert (second.canary_new, second.canary_old) == (first.canary_new, first.canary_old)


def test_adapter_trained_on_wrong_answers_is_rejected(proxy: ProxyServer, real_vllm: RealVLLM,
                                                      good: dict[str, Any]) -> None:
    base = real_vllm.served_name
    svc = proxy.app.services.adapt
    assert svc is not None
    steps = svc.config.max_steps
    svc.config.max_steps = 5  # enough to make it wrong; half the time
    try:
        job = wait_job(proxy, start_run(proxy, run_body("tenant-b", digit=3)))
    finally:
        svc.config.max_steps = steps
    name = f"{base}-tenant-b-v1"
    assert job["status"] == "rejected", job
    assert job["adapter"] == name and job["score_new"] < job["score_old"] + 0.1
    assert adapters(proxy, "tenant-b")[name]["status"] == "rejected"
    eventually(lambda: name not in upstream_models(real_vllm))  # unloaded after the gate
    b = chat(proxy, "kb", question(UNSEEN), base)
    assert b["model"] == base  # never routed


class CopyTrainer(Trainer):
    """"Trains" instantly by copying an adapter already trained (the swap is under test here)."""

    def __init__(self, source: str) -> None:
        self.source = source

    async def run(self, job: TrainJob) -> TrainOutcome:
        shutil.copytree(self.source, job.out_dir)
        return TrainOutcome(True, "done", adapter_path=job.out_dir, progress={"status": "done", "copied": True})

    def progress(self, job: TrainJob) -> dict[str, Any]:
        return {}

    async def cancel(self, job: TrainJob) -> None:
        pass


def test_swap_under_load_loses_no_request(proxy: ProxyServer, real_vllm: RealVLLM, good: dict[str, Any]) -> None:
    base = real_vllm.served_name
    svc = proxy.app.services.adapt
    assert svc is not None
    old = svc.registry.active("tenant-a", base)
    assert old is not None
    stop = threading.Event()
    seen: Counter[str] = Counter()
    errors: list[str] = []

    def worker(i: int) -> None:
        with httpx.Client(timeout=120, trust_env=False) as http:
            while not stop.is_set():
                try:
                    r = http.post(proxy.url + "/chat/completions", headers={"authorization": "Bearer ka"},
                                  json={"model": base, "max_tokens": 8, "temperature": 0,
                                        "messages": [{"role": "user", "content": question(HELDOUT_WORDS[i])}]})
                    if r.status_code == 200:
                        seen[r.json()["model"]] += 1
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    trainer, margin = svc.trainer, svc.config.gate_margin
    svc.trainer = CopyTrainer(svc.registry.get(old).path)  # type: ignore[union-attr]
    svc.config.gate_margin = -1.0  # the copy scores as well as the original: promote it anyway
    for t in threads:
        t.start()
    try:
        eventually(lambda: seen[old] >= 4)
        job = wait_job(proxy, start_run(proxy, run_body("tenant-a")), timeout=240)
        assert job["status"] == "succeeded", job
        new = job["adapter"]
        assert new != old and svc.registry.active("tenant-a", base) == new
        eventually(lambda: seen[new] >= 4)
        eventually(lambda: old not in upstream_models(real_vllm))  # unloaded once its requests finished
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
        svc.trainer, svc.config.gate_margin = trainer, margin
    print(f"responses by model: {dict(seen)}; errors: {len(errors)}")
    assert errors == []
    assert set(seen) == {old, new}  # all routed to an adapter, before and after the switch
    v = adapters(proxy, "tenant-a")
    assert v[old]["status"] == "retired" and v[new]["status"] == "active" and v[new]["parent"] == old
    assert svc.registry.in_flight(old) == 0 and svc.registry.in_flight(new) == 0


def test_rollback_goes_back(proxy: ProxyServer, real_vllm: RealVLLM, good: dict[str, Any]) -> None:
    base = real_vllm.served_name
    svc = proxy.app.services.adapt
    assert svc is not None
    current = svc.registry.active("tenant-a", base)
    assert current is not None
    parent = svc.registry.get(current).parent  # type: ignore[union-attr]
    steps = [(current, parent or base)] + ([(parent, base)] if parent else [])
    for rolled, now in steps:
        r = httpx.post(proxy.root + "/admin/adapters/rollback", headers=ADMIN, json={"tenant": "tenant-a"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json() == {"rolled_back": rolled, "now": now, "reason": "by hand"}
        assert chat(proxy, "ka", question(UNSEEN), base)["model"] == now
        eventually(lambda rolled=rolled: rolled not in upstream_models(real_vllm))  # type: ignore[misc]
        assert adapters(proxy, "tenant-a")[rolled]["status"] == "rolled_back"
    r = httpx.post(proxy.root + "/admin/adapters/rollback", headers=ADMIN, json={"tenant": "tenant-a"}, timeout=60)
    assert r.status_code == 404
    assert chat(proxy, "ka", question(UNSEEN), base)["model"] == base


def test_trainer_crash_fails_the_job_and_the_server_keeps_answering(
        real_vllm: RealVLLM, tmp_path: Path) -> None:
    empty = tmp_path / "no-weights"
    empty.mkdir()
    with ProxyServer(real_vllm.base_url, data_dir=str(tmp_path / "data"), admin_key="adm",
                     adapt={"enabled": True, "tenants": ["*"], "base_model_path": str(empty), "max_steps": 2},
                     memory={"embedder": "hashing", "distill": False}) as p:
        job = wait_job(p, start_run(p, run_body("default")), timeout=240)
        assert job["status"] == "failed" and job["error"], job
        assert job["train"].get("status") == "failed" and "traceback" in job["train"]
        [v] = adapters(p).values()
        assert v["status"] == "failed" and not Path(v["path"]).exists()
        r = chat(p, "unused", "Say hello.", real_vllm.served_name)
        assert text(r).strip() and r["model"] == real_vllm.served_name
        assert httpx.get(p.root + "/admin/adaptation", headers=ADMIN, timeout=30).json()["running"] is False


def test_consensus_cycle_on_real_samples(real_vllm: RealVLLM, tmp_path: Path) -> None:
    """Queued questions labelled by the model's own vote (one real n=4 call each), clear
    majorities trained on, gated, with every phase timed and the figures in /admin/adapters."""
    with ProxyServer(real_vllm.base_url, data_dir=str(tmp_path / "data"), admin_key="adm",
                     adapt={"enabled": True, "tenants": ["*"], "base_model_path": str(real_vllm.model_path),
                            "max_steps": 2, "label_n": 4, "label_max_tokens": 24, "min_share": 0.5,
                            # prose samples only (SmolLM2's programs for these split the vote) and
                            # cool ones: at 0.8, and at 0.3 with programs, it kept 1 of 4 on CI's machine
                            "label_pal": 0, "label_temperature": 0.1,
                            "threads": 1, "gate_max_tokens": 24},
                     memory={"embedder": "hashing", "distill": False}) as p:
        svc = p.app.services.adapt
        assert svc is not None
        eventually(lambda: svc.base is not None)
        # six, not four: SmolLM2's samples of one of them still split now and then
        words = ["apple", "river", "stone", "cloud", "green", "table"]
        for word in words:
            svc.queue.add("default", f"Repeat this word exactly once: {word}", "", 0.9, real_vllm.served_name)
        job = wait_job(p, start_run(p, {"tenant": "default"}), timeout=300)
        lab = job["report"].get("labelling")
        if job["status"] == "failed" and "clear consensus" in (job["error"] or ""):
            assert svc.queue.counts() == {"default": len(words)}  # put back, not lost
            pytest.skip(f"SmolLM2 reached no clear majority here: {job['error']}")
        assert lab is not None and lab["questions"] == len(words) and lab["kept"] >= 2, job
        assert job["status"] in ("succeeded", "rejected"), job
        assert {"label", "train", "gate"} <= set(job["phases_s"]), job
        assert job["train"]["status"] == "done"
        [v] = adapters(p).values()
        assert v["report"]["heldout"]["score_after"] == job["score_new"]
        assert v["report"]["labelling"] == lab and svc.queue.counts() == {}


def test_a_live_requests_samples_are_queued_for_labelling(real_vllm: RealVLLM, tmp_path: Path) -> None:
    """A self_consistency request on the real model queues its question with the 4 candidates
    it drew, as vLLM returned them: what labelling counts instead of drawing them again."""
    p = ProxyServer(real_vllm.base_url, data_dir=str(tmp_path), admin_key="adm", api_keys=KEYS,
                    adapt={"enabled": True, "tenants": ["*"], "base_model_path": str(real_vllm.model_path),
                           "uncertainty_threshold": 0.0},
                    memory={"enabled": False})
    with p:
        body = chat(p, "ka", "What is 2 + 3? End with 'The answer is N.'", real_vllm.served_name,
                    strategy={"name": "self_consistency", "n": 4}, temperature=0.8)
        svc = p.app.services.adapt
        assert svc is not None
        [q] = eventually(lambda: svc.queue.pending("tenant-a"))
        assert q.task == "What is 2 + 3? End with 'The answer is N.'"
        assert len(q.samples) == 4 and all(s.content and s.logprob is not None for s in q.samples)
        assert {s.finish_reason for s in q.samples} <= {"stop", "length"}
        assert body["usage"]["completion_tokens"] > 0 and not any(s.program for s in q.samples)


def test_rationalization_on_the_real_model(real_vllm: RealVLLM) -> None:
    """STaR's hinted call on the real model: one n=8 call of the question with its label, and
    what comes back are finished rationales that reach the label and never mention the hint.
    (n=4 at temperature 0.8 came back with no rationale reaching 5 in one full-suite run.)"""
    question = "What is 2 + 3? End with 'The answer is N.'"

    async def run() -> list[str]:
        up = Upstream(real_vllm.base_url, UpstreamSettings())
        try:
            lab = Label(question, "5", 1.0, 0.5, 4)
            return await MajorityVote(4, temperature=0.5, max_tokens=96, rationalize=8).rationalize(
                up, real_vllm.served_name, "default", lab)
        finally:
            await up.aclose()

    got = asyncio.run(run())
    print("rationales:", got)
    assert got, "none of 8 hinted samples of SmolLM2 reached 5"
    for text in got:
        answer, form = final_answer(text, "stop", placeholders(question))
        assert answer == "5" and form == FORM_OK and "hint" not in text.lower()


def test_pooled_labelling_on_the_real_model(real_vllm: RealVLLM) -> None:
    """``label_vote: pooled`` on the real model: 4 prose samples and 2 programs (run in the
    sandbox) vote together, one vote per answer that ran, and the programs decide nothing alone."""
    question = "What is 2 + 3? End with 'The answer is N.'"

    async def run() -> Label:
        up = Upstream(real_vllm.base_url, UpstreamSettings())
        try:
            return await MajorityVote(4, temperature=0.8, max_tokens=96, pal=2, programs_decide=False).label(
                up, real_vllm.served_name, "default", question)
        finally:
            await up.aclose()

    lab = asyncio.run(run())
    print("label:", lab.answer, lab.share, lab.n, lab.program)
    assert 4 <= lab.n <= 6  # 4 prose votes, plus each program that printed an answer
    if lab.answer is not None:
        votes = round(lab.share * lab.n)
        assert votes >= 1 and abs(votes - lab.share * lab.n) < 1e-9  # a share of the pooled votes
        assert lab.program in (None, lab.answer)
        for text in lab.agreeing:
            assert final_answer(text, "stop", placeholders(question))[0] == lab.answer


def test_traced_labelling_on_the_real_model(real_vllm: RealVLLM) -> None:
    """``adapt.label_traces`` on the real model: a live request's two programs (as ``best_of_n``
    keeps them) agree, so they decide the label; their working, run again traced in the real
    sandbox, comes first among the rationales, and the real model's prose is drawn for the rest."""
    if shutil.which("bwrap") is None:
        pytest.skip("the sandbox needs bubblewrap (make system-deps installs it)")
    question = "What is 12 * 3 + 4? End with 'The answer is N.'"
    program = "```python\nt = 12 * 3 + 4\nprint(t)\n```\n\nThe program printed 40.\nThe answer is 40."
    prior = [Sample(program, "40", "stop", -0.1, program=True), Sample(program, "40", "stop", -0.2, program=True)]

    async def run() -> Label:
        up = Upstream(real_vllm.base_url, UpstreamSettings())
        try:
            return await MajorityVote(4, temperature=0.8, max_tokens=96, pal=2, traces=True).label(
                up, real_vllm.served_name, "default", question, prior)
        finally:
            await up.aclose()

    lab = asyncio.run(run())
    print("label:", lab.answer, lab.share, lab.n, lab.traced, lab.agreeing)
    assert (lab.answer, lab.program, lab.traced, lab.reused) == ("40", "40", 1, 2)
    assert lab.agreeing[0] == "t = 12 * 3 + 4\n= 36 + 4\n= 40\nThe answer is 40."
    assert lab.n == 6  # the real model's 4 prose samples were drawn beside the 2 programs
    for text in lab.agreeing[1:]:
        assert final_answer(text, "stop", placeholders(question))[0] == "40"
