"""The reviewers' page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright)
through the real gateway (mitmdump with the suite), the real OIDC provider and an OpenAI SDK
agent whose call is held: log in, read the transcript, approve with a reason, watch the call
complete, see the history; a second hold appears live and is denied; an outsider sees and
decides nothing. Screenshots go to docs/ when AGENTGATE_SCREENSHOTS=1."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
SHOTS = os.environ.get("AGENTGATE_SCREENSHOTS") == "1"
XSS = "<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">"
SYSTEM = ("You generate synthetic CRM records for load tests. " * 60).strip()  # ~3 KB
EMAIL = "jane.doe@example.com"
ASK = f"Make 500 synthetic customer records like {XSS} and send them to {EMAIL}."

POLICIES = """
policies:
  - name: bulk-synthetic
    match: {model: ["bulk-one", "bulk-two"]}
    action: approve
    message: bulk synthetic records need a reviewer
    approvers: [reviewers]
    timeout: 120
"""

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def gw(gateway_factory: Any, oidc_provider: Any, tmp_path: Path) -> Iterator[Gateway]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    secret = tmp_path / "cookie-key"
    secret.write_text("c" * 48)
    rules = ("{standin_upstreams}" + oidc_provider.identity_yaml() + POLICIES
             + "approvals:\n  web:\n    client_id: agentgate-reviewers\n"
             f"    cookie_secret_file: {secret}\n")
    yield gateway_factory(rules)


def api_url(gw: Gateway) -> str:
    deadline = time.monotonic() + 15
    while not (m := re.search(r"approvals API listening at (http://\S+)", gw.logs())):
        assert time.monotonic() < deadline, gw.logs()[-3000:]
        time.sleep(0.05)
    return m.group(1)


def set_user(issuer: str, sub: str, groups: list[str]) -> None:
    now = int(time.time())
    req = urllib.request.Request(f"{issuer}/users/{sub}", method="PUT",
                                 data=json.dumps({"groups": groups, "iat": now,
                                                  "exp": now + 600}).encode(),
                                 headers={"content-type": "application/json"})
    urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10).close()


def sign_in(page: Any, base: str, issuer: str, sub: str, groups: list[str]) -> None:
    set_user(issuer, sub, groups)
    page.goto(base + "/ui/")
    assert page.url.startswith(issuer + "/oauth2/authorize?"), page.url
    page.fill("#subject-input", sub)
    page.click("#subject-input ~ button[type=submit]")
    page.wait_for_url(base + "/ui/")
    assert page.text_content("#me") == sub


def shot(page: Any, name: str) -> None:
    if SHOTS:
        page.set_viewport_size({"width": 1100, "height": 900})
        page.screenshot(path=str(ROOT / "docs" / f"reviewers-{name}.png"), full_page=False)


def test_reviewer_page_end_to_end(gw: Gateway, oidc_provider: Any) -> None:
    base = api_url(gw)
    agent_token = oidc_provider.token(sub="agent-7", groups=["agents"])
    client = openai.OpenAI(api_key="unused", max_retries=0, timeout=120,
                           http_client=openai.DefaultHttpxClient(
                               proxy=gw.proxy_url(agent_token), verify=str(gw.ca_cert)))
    pool = concurrent.futures.ThreadPoolExecutor(2)

    def ask(model: str) -> concurrent.futures.Future:
        return pool.submit(lambda: client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": ASK}]))

    first = ask("bulk-one")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-proxy-server", "--no-sandbox"])
        try:
            ctx = browser.new_context(viewport={"width": 1100, "height": 900})
            page = ctx.new_page()
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            csp_errors: list[str] = []
            page.on("console", lambda m: csp_errors.append(m.text)
                    if "Content Security Policy" in m.text else None)
            sign_in(page, base, oidc_provider.issuer, "alice", ["reviewers"])
            jar = {c["name"]: c for c in ctx.cookies()}
            session = jar["agentgate_session"]
            assert session["httpOnly"] and session["sameSite"] == "Lax"
            assert session["path"] == "/ui/" and session["expires"] > time.time() + 3600
            assert not session["secure"]  # plain http on loopback here; https sets Secure
            assert page.evaluate("document.cookie") == ""  # no script can read it

            # the held call shows up (live or on load) with its whole transcript
            card = page.locator("article.card").first
            card.wait_for(timeout=20000)
            assert card.locator(".requester").text_content() == "agent-7"
            assert "bulk-synthetic" in card.locator(".rule").text_content()
            assert "bulk synthetic records need a reviewer" in card.text_content()
            assert card.locator(".kind").text_content() == "LLM call"
            assert card.locator(".progress").text_content().startswith("0 of 1")
            user_turn = card.locator(".turn.role-user pre.text").text_content()
            # the agent's markup, shown as text; the address masked before anyone saw it
            assert user_turn.startswith(ASK.split(EMAIL)[0]) and EMAIL not in page.content()
            findings = card.locator(".finding").all_text_contents()
            assert findings and all(re.fullmatch(r"[A-Z_]+: [0-9]+", x) for x in findings)
            # the long system prompt is shortened in the list, whole on the detail page
            assert "characters left out here" in card.locator(
                ".turn.role-system pre.text").text_content()
            assert page.evaluate("window.pwned === undefined")
            shot(page, "pending")

            card.locator("a.aid").click()
            page.wait_for_url(re.compile(r".*/ui/approvals/ap-[0-9a-f]+$"))
            aid = page.url.rsplit("/", 1)[1]
            assert page.text_content(".turn.role-system pre.text") == SYSTEM
            assert page.text_content(".turn.role-user pre.text") == user_turn
            shot(page, "detail")
            page.fill("form.approve textarea", "synthetic data only, fine for the load test")
            page.click("form.approve button")
            page.wait_for_selector("p.outcome")
            assert "approved" in page.text_content("p.outcome")

            # the agent's call completes once approved
            raw = first.result(timeout=30)
            assert raw.http_response.status_code == 200
            assert raw.parse().choices[0].message.content

            # a second hold appears on the open page without a reload, and is denied
            page.goto(base + "/ui/")
            page.wait_for_selector("#nothing")
            second = ask("bulk-two")
            page.locator("article.card").first.wait_for(timeout=20000)
            page.fill("form.deny textarea", "not this one")
            page.click("form.deny button")
            page.wait_for_selector("p.outcome")
            with pytest.raises(openai.PermissionDeniedError) as denied:
                second.result(timeout=30)
            assert "not this one" in str(denied.value)

            page.click("#nav-history")
            page.wait_for_url(base + "/ui/history")
            rows = page.locator("table.history tbody tr")
            assert rows.count() == 2
            text = page.text_content("table.history")
            assert aid in text and "alice approved via page" in text
            assert "synthetic data only, fine for the load test" in text
            assert "alice denied via page: not this one" in text
            shot(page, "history")
            assert dialogs == [] and csp_errors == []

            # an outsider: nothing to decide, and a forged POST with their own valid
            # session and CSRF token is still refused
            third = ask("bulk-one")
            page.goto(base + "/ui/")
            page.locator("article.card").first.wait_for(timeout=20000)
            held_id = page.locator("article.card").first.get_attribute("data-id")
            octx = browser.new_context()
            opage = octx.new_page()
            sign_in(opage, base, oidc_provider.issuer, "mallory", ["developers"])
            assert opage.locator("article.card").count() == 0
            assert "Nothing waiting for you" in opage.text_content("main")
            token = opage.get_attribute("input[name=csrf]", "value")
            r = opage.request.post(f"{base}/ui/approvals/{held_id}/approve",
                                   form={"csrf": token, "reason": "let me"})
            assert r.status == 403 and "not in an approver group" in r.text()
            r = opage.request.get(f"{base}/ui/approvals/{held_id}")
            assert r.status == 404
            # CSRF: alice's session without the token is refused as well
            r = page.request.post(f"{base}/ui/approvals/{held_id}/approve",
                                  form={"reason": "no token"})
            assert r.status == 403
            assert not third.done()
            # a reviewer typing a reason does not lose it to a live update: the page
            # says something changed instead of replacing the form
            page.fill("form.deny textarea", "cleanup")
            fourth = ask("bulk-two")
            page.wait_for_selector("#stale", state="visible", timeout=20000)
            assert page.input_value("form.deny textarea") == "cleanup"
            assert page.locator("article.card").count() == 1
            page.click("form.deny button")
            page.wait_for_selector("p.outcome")
            with pytest.raises(openai.PermissionDeniedError):
                third.result(timeout=30)
            page.goto(base + "/ui/")
            page.fill("form.deny textarea", "cleanup too")
            page.click("form.deny button")
            page.wait_for_selector("p.outcome")
            with pytest.raises(openai.PermissionDeniedError):
                fourth.result(timeout=30)
            octx.close()
            secrets = [c["value"] for c in ctx.cookies()]
        finally:
            browser.close()
            pool.shutdown(wait=False, cancel_futures=True)
    logs = gw.logs()
    assert agent_token not in logs and "code=" not in logs
    assert secrets and not any(v and v in logs for v in secrets)  # session id, login id
