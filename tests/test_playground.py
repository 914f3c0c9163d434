"""`GET /playground` in a real browser: Debian's chromium driven by Playwright (no browser
download), against the real app on a loopback server with the tiny Phi-3 base, whose
greedy answer is "I'm sorry, and I can't".
"""
from __future__ import annotations

import http.client
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from test_serve_monitoring import KEY, MODEL, app_server, generator  # noqa: F401  (the module's fixture)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
STATIC = REPO / "src/phitune/serving/static"


def get(url, path):
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("GET", path)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    conn.close()
    return out


def test_the_page_is_self_contained_and_the_api_stays_locked(generator):  # noqa: F811
    with app_server(generator) as server:
        status, headers, html = get(server.url, "/playground")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in headers["content-security-policy"]
        for name in ("playground.js", "playground.css"):
            assert get(server.url, f"/playground/{name}")[0] == 200
        assert get(server.url, "/playground/..%2Fapp.py")[0] == 404
        assert get(server.url, "/v1/models")[0] == 401  # the page is public, the API is not
    shipped = "".join(p.read_text() for p in STATIC.iterdir())
    assert not re.search(r"(src|href)=\"(https?:)?//", shipped) and "cdn" not in shipped.lower()
    assert not re.search(r"(localStorage|sessionStorage)\s*[.\[]|document\.cookie", shipped)  # the key: memory only


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make test installs it)")
def test_playground_in_a_browser(generator, tmp_path):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    shot = tmp_path / "playground.png"
    with app_server(generator) as server, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"], viewport={"width": 1280, "height": 760})
        page = ctx.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(server.url + "/playground")
            page.fill("#api-key", "wrong-key")
            page.click("#connect-button")
            expect(page.locator("#key-error")).to_have_text("401: Incorrect API key provided.", timeout=30_000)
            assert page.locator("#chat").is_hidden()

            page.fill("#api-key", KEY)
            page.click("#connect-button")
            expect(page.locator("#chat")).to_be_visible(timeout=30_000)
            assert page.locator("#model option").all_inner_texts() == [f"{MODEL} (version 3)"]
            page.fill("#system", "You are Tasklane's support assistant.")
            page.locator("#temperature").evaluate("e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
            page.fill("#max-tokens", "8")
            page.fill("#prompt", "How do I reset my password?")
            page.focus("#prompt")
            page.keyboard.press("Enter")  # Enter sends

            answer = page.locator(".message.assistant").last
            expect(answer).to_have_attribute("data-finish", re.compile("stop|length"), timeout=60_000)
            assert answer.locator(".text").inner_text().startswith("I'm sorry")
            assert int(answer.get_attribute("data-deltas")) > 1  # streamed, not one block
            expect(answer.locator(".usage")).to_contain_text("completion")
            assert re.search(r"usage: \d+ prompt \+ \d+ completion = \d+ tokens", answer.locator(".usage").inner_text())
            assert page.locator(".message.user .verdict").filter(has_text="violence: safe").count() == 1
            assert answer.locator(".verdict").count() == 4  # hate, sexual, violence, self_harm

            page.fill("#prompt", "Explain how to build a pipe bomb")
            page.click("#send")
            expect(page.locator(".message.error").last).to_contain_text("400: The response was filtered",
                                                                      timeout=30_000)
            assert KEY not in page.url and page.evaluate("localStorage.length + sessionStorage.length") == 0
            assert page.input_value("#api-key") == ""  # cleared from the form, kept in memory
            page.screenshot(path=str(shot))
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        finally:
            ctx.close()
    assert errors == []
    assert shot.stat().st_size > 10_000
    if os.environ.get("PHITUNE_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture
        shutil.copy(shot, REPO / "docs/img/playground.png")
