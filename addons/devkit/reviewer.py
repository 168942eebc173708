"""A reviewer on the reviewers' page the way a browser is, in plain HTTP (no browser needed).

`PageReviewer` keeps cookies like a browser, signs in through the gateway's OIDC login
(authorization code + PKCE, run by the gateway) at the dev IdP's login form, reads the
CSRF token from the page and posts the page's own approve/deny forms. The demo uses it to
approve a held call on the page, and the dev mode's test to prove the printed sign-in
works. It talks to the page and the IdP directly, never through an HTTP(S)_PROXY.

Only what a browser would do: it does not know the session, login or CSRF values in
advance, it reads them from what the gateway sends.
"""

from __future__ import annotations

import http.cookiejar
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from typing import Any

TIMEOUT = 20.0
MAX_PAGE = 8 * 1024 * 1024


class PageError(Exception):
    """A step of the page flow failed; the message says which (no cookie or code in it)."""


class _Forms(HTMLParser):
    """The forms of a page (action, class, hidden inputs) and the cards' approval ids."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self.cards: list[str] = []
        self.me = ""
        self._in_me = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "class": a.get("class", ""),
                               "fields": {}})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value", "")
        elif tag == "article" and "card" in a.get("class", "").split() and a.get("data-id"):
            self.cards.append(a["data-id"])
        elif a.get("id") == "me":
            self._in_me = True

    def handle_data(self, data: str) -> None:
        if self._in_me:
            self.me += data

    def handle_endtag(self, tag: str) -> None:
        self._in_me = False


def parse(html: str) -> _Forms:
    p = _Forms()
    p.feed(html)
    p.close()
    return p


class PageReviewer:
    def __init__(self, base: str, timeout: float = TIMEOUT) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout
        self.jar = http.cookiejar.CookieJar()
        self._open = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(self.jar)).open
        self.sub = ""
        self.csrf = ""

    def _request(self, url: str, form: dict[str, str] | None = None) -> tuple[str, str]:
        """GET (or POST a form), following redirects -> (final URL, page text)."""
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(url, data=data, headers={"accept": "text/html"})  # noqa: S310 - http(s) URLs of the page and the IdP
        try:
            with self._open(req, timeout=self.timeout) as resp:
                return resp.geturl(), resp.read(MAX_PAGE).decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            body = e.read(4096).decode("utf-8", "replace")
            raise PageError(f"{urllib.parse.urlsplit(url).path}: HTTP {e.code} "
                            f"{page_text(body)[:300]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise PageError(f"{url}: {getattr(e, 'reason', e)}") from None

    def sign_in(self, sub: str) -> str:
        """Open the page, get sent to the IdP's login form, sign in as `sub`, land on the
        page with a session. Returns the pending page's HTML."""
        url, html = self._request(self.base + "/ui/")
        if url.startswith(self.base + "/ui/") and "/oauth2/authorize" not in url:
            raise PageError("the page did not send the browser to the identity provider "
                            f"(landed on {urllib.parse.urlsplit(url).path})")
        # the IdP's login form posts to its own address with the subject to sign in as
        url, html = self._request(url, {"sub": sub})
        if not url.startswith(self.base + "/ui/"):
            raise PageError("the identity provider did not send the browser back to the page")
        page = parse(html)
        if page.me.strip() != sub:
            raise PageError(f"signed in, but the page names {page.me.strip()!r}, not {sub!r}")
        self.sub = sub
        self._csrf_from(page)
        return html

    def _csrf_from(self, page: _Forms) -> None:
        for f in page.forms:
            if f["fields"].get("csrf"):
                self.csrf = f["fields"]["csrf"]
                return
        raise PageError("the page carries no CSRF token (not signed in?)")

    def pending(self) -> list[str]:
        """The approval ids on the pending page (newest first)."""
        _, html = self._request(self.base + "/ui/")
        page = parse(html)
        self._csrf_from(page)
        return page.cards

    def detail(self, approval_id: str) -> str:
        _, html = self._request(f"{self.base}/ui/approvals/{urllib.parse.quote(approval_id)}")
        return html

    def vote(self, approval_id: str, action: str, reason: str = "") -> str:
        """Post the page's approve/deny form of this approval, as the browser does: the
        form's own action and CSRF token, read from the detail page. Returns the visible
        text of the detail page the gateway answers with (its outcome and votes)."""
        page = parse(self.detail(approval_id))
        form = next((f for f in page.forms if action in f["class"].split()), None)
        if form is None:
            raise PageError(f"the page offers no {action} form for {approval_id} "
                            "(not yours to decide, or already decided)")
        fields = dict(form["fields"])
        fields["reason"] = reason
        _, html = self._request(urllib.parse.urljoin(self.base + "/", form["action"]), fields)
        return page_text(html)

    def history(self) -> str:
        _, html = self._request(self.base + "/ui/history")
        return page_text(html)


def page_text(html: str) -> str:
    """A page's visible text, whitespace collapsed (for messages and checks)."""
    class T(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.parts: list[str] = []
            self._skip = 0

        def handle_starttag(self, tag: str, attrs: Any) -> None:
            self._skip += tag in ("script", "style")

        def handle_endtag(self, tag: str) -> None:
            self._skip -= tag in ("script", "style") and self._skip > 0

        def handle_data(self, data: str) -> None:
            if not self._skip:
                self.parts.append(data)
    t = T()
    t.feed(html)
    return " ".join(" ".join(t.parts).split())
