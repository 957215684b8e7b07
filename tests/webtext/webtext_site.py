"""Helpers of the WebText tests: a generated website served on 127.0.0.1 and generated Reddit dumps.

The site has articles, exact and near duplicates, non-English pages, 404/500, a flaky page, slow
pages, a redirect loop, binary content, huge pages, malformed HTML and a robots.txt disallow. It
records every request, the User-Agent, and the most requests in flight at once.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import zstandard

ENGLISH = """the of and to in is that it was for on are as with his they at be this from have or by one
had not but what all were when we there can an your which their said if do will each about how up out them
then she many some so these would other into has more her two like him see time could no make than first been
its who now people my made over did down only way find use may water long little very after words called
just where most know get through back much before go good new write our used me man too any day same right
look think also around another came come work three word must because does part even place well such here
take why things help put years different away again off went old number great tell men say small every found
still between name should home big give air line set own under read last never us left end along while might
next sound below saw something thought both few those always looked show large often together asked house
world going want school important until form food keep children feet land side without boy once animals life
enough took sometimes four head above kind began almost live page got earth need far hand high year mother
light parts country father let night following picture being study second eyes soon times story boys since
white days paper hard near sentence better best across during today others however sure means knew try told
young miles sun ways thing whole hear example heard several change answer room sea against top turned learn
point city play toward five using himself usually money seen car morning river market report government""".split()

GERMAN = """der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an
werden aus er hat dass sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur oder
aber vor zur bis mehr durch man sein wurde sei hatte kann gegen vom können schon wenn habe seine ihre dann
unter wir soll ich eines jahr zwei jahren diese dieser wieder keine seiner worden will zwischen immer millionen
ihr sagte ihrer neue beim mal""".split()

FRENCH = """le de un être et à il avoir ne je son que se qui ce dans en du elle au pour pas que vous par sur
faire plus dire me on mon lui nous comme mais pouvoir avec tout y aller voir en bien où sans tu ou leur homme
si deux mari moi vouloir te femme venir quand grand celui si notre devoir là jour prendre même votre tout rien
petit encore aussi quelque dont tout mer trouver donner temps ça peu même falloir sous parler alors
autre""".split()


def words_text(words: list[str], n_words: int, seed: int) -> list[str]:
    """Paragraphs of pseudo-sentences drawn from `words` (deterministic for a seed)."""
    rng = random.Random(seed)
    paragraphs, sentence, paragraph = [], [], []
    for _ in range(n_words):
        sentence.append(rng.choice(words))
        if len(sentence) >= rng.randint(8, 16):
            paragraph.append(" ".join(sentence).capitalize() + ".")
            sentence = []
            if len(paragraph) >= 4:
                paragraphs.append(" ".join(paragraph))
                paragraph = []
    if sentence:
        paragraph.append(" ".join(sentence).capitalize() + ".")
    if paragraph:
        paragraphs.append(" ".join(paragraph))
    return paragraphs


def article_html(title: str, paragraphs: list[str], nav: str = "Home About Contact") -> str:
    body = "\n".join(f"<p>{p}</p>" for p in paragraphs)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
        f"<nav><a href='/'>{nav}</a></nav><article><h1>{title}</h1>{body}</article>"
        f"<footer>Copyright 2019 Example News. All rights reserved.</footer></body></html>"
    )


def near_duplicate(paragraphs: list[str], seed: int) -> list[str]:
    """Change about one word in forty."""
    rng = random.Random(seed)
    out = []
    for p in paragraphs:
        words = p.split()
        for i in range(0, len(words), 40):
            words[min(len(words) - 1, i + rng.randint(0, 39))] = "changed"
        out.append(" ".join(words))
    return out


class Site:
    """Pages of the test website: path -> (status, headers, body) or a special behaviour."""

    N_ARTICLES = 6

    def __init__(self):
        self.pages: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.articles = {}
        for i in range(self.N_ARTICLES):
            paragraphs = words_text(ENGLISH, 420, seed=i)
            self.articles[i] = paragraphs
            self.html(f"/article/{i}", article_html(f"Story number {i}", paragraphs))
        self.html("/dup/exact", article_html("Story number 0", self.articles[0]))
        self.html("/dup/near", article_html("Story number 1 (updated)", near_duplicate(self.articles[1], seed=99)))
        self.html("/foreign/de", article_html("Nachrichten", words_text(GERMAN, 420, seed=7)))
        self.html("/foreign/fr", article_html("Nouvelles", words_text(FRENCH, 420, seed=8)))
        self.html("/short", article_html("Brief", words_text(ENGLISH, 60, seed=11)))
        self.html("/empty", "<html><head><title>Nothing</title></head><body><nav>Home</nav></body></html>")
        malformed = (
            article_html("Broken", words_text(ENGLISH, 400, seed=12))
            .replace("</p>", "")
            .replace("</article>", "<div><b><i>")
        )
        self.html("/malformed", malformed[: -len("</body></html>")])
        self.html("/private/secret", article_html("Secret", words_text(ENGLISH, 400, seed=13)))
        self.pages["/binary"] = (
            200,
            {"Content-Type": "application/octet-stream"},
            bytes(random.Random(1).randbytes(20000)),
        )
        self.pages["/photo"] = (200, {"Content-Type": "image/png"}, b"\x89PNG\r\n\x1a\n" + bytes(5000))
        self.pages["/huge"] = (200, {"Content-Type": "text/html"}, article_html("Huge", ["word " * 400_000]).encode())
        self.pages["/huge-unsized"] = (
            200,
            {"Content-Type": "text/html", "X-No-Length": "1"},
            article_html("Huge", ["word " * 400_000]).encode(),
        )
        self.pages["/untyped"] = (
            200,
            {"X-No-Type": "1"},
            article_html("Untyped", words_text(ENGLISH, 400, seed=14)).encode(),
        )
        self.pages["/missing"] = (404, {"Content-Type": "text/html"}, b"<html>not found</html>")
        self.pages["/error"] = (500, {"Content-Type": "text/html"}, b"<html>server error</html>")
        self.pages["/loop/a"] = (302, {"Location": "/loop/b"}, b"")
        self.pages["/loop/b"] = (302, {"Location": "/loop/a"}, b"")
        self.pages["/moved"] = (301, {"Location": "/article/5"}, b"")
        self.pages["/robots.txt"] = (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private/\n")
        self.slow_paths = {"/slow"}
        self.flaky_paths = {"/flaky": 1}  # path -> how many 503s before it works
        self.html("/flaky", article_html("Flaky", words_text(ENGLISH, 400, seed=15)))
        self.html("/slow", article_html("Slow", words_text(ENGLISH, 400, seed=16)))

    def html(self, path: str, text: str) -> None:
        self.pages[path] = (200, {"Content-Type": "text/html; charset=utf-8"}, text.encode("utf-8"))


class SiteServer:
    """A threaded HTTP server for a `Site` on 127.0.0.1 with request accounting and a gate.

    `hold_after(n)`: after n pages have been served, further requests wait (and then get no
    answer) until `release()` — a crawl killed meanwhile got exactly those n pages.
    """

    def __init__(self, site: Site, slow_seconds: float = 2.0):
        self.site, self.slow_seconds = site, slow_seconds
        self.requests: Counter = Counter()  # every request received, by path
        self.served: Counter = Counter()  # every response sent, by path
        self.user_agents: set[str] = set()
        self.in_flight = self.max_in_flight = 0
        self.held = 0
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.hold_limit: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def hold_after(self, n: int) -> None:
        self.hold_limit = n
        self.gate.clear()

    def release(self) -> None:
        self.hold_limit = None
        self.gate.set()

    def pages_served(self) -> int:
        return sum(n for path, n in self.served.items() if path != "/robots.txt")

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path
        # In flight: from arrival until the answer is sent (the client may ask again as soon as it
        # arrives). Slow pages are left out: the client gives up on them while the server sleeps on.
        counted = path not in self.site.slow_paths
        with self.lock:
            self.requests[path] += 1
            self.user_agents.add(request.headers.get("User-Agent", ""))
            held = path != "/robots.txt" and self.hold_limit is not None and self.pages_served() >= self.hold_limit
            if held:
                self.held += 1
            self.in_flight += counted
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if held:
                self.gate.wait()
                return  # the client that asked is gone: answer nothing
            if path in self.site.slow_paths:
                time.sleep(self.slow_seconds)
            status, headers, body = self.site.pages.get(path, (404, {"Content-Type": "text/html"}, b"<html>no</html>"))
            with self.lock:
                if self.site.flaky_paths.get(path, 0) > 0:
                    self.site.flaky_paths[path] -= 1
                    status, headers, body = 503, {"Content-Type": "text/html"}, b"<html>busy</html>"
                self.served[path] += 1
            time.sleep(0.01)  # lets concurrent requests overlap so limits are visible
            with self.lock:
                self.in_flight -= counted
                counted = False
            self._send(request, status, headers, body)
        finally:
            with self.lock:
                self.in_flight -= counted

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        try:
            request.send_response(status)
            for key, value in headers.items():
                if not key.startswith("X-"):
                    request.send_header(key, value)
            if "X-No-Length" not in headers:
                request.send_header("Content-Length", str(len(body)))
            if "Content-Type" not in headers and "X-No-Type" not in headers:
                request.send_header("Content-Type", "text/html")
            request.end_headers()
            request.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()


def submission(url: str, score: int, *, subreddit: str = "news", title: str = "A link", **extra) -> dict:
    post = {
        "id": f"t{abs(hash((url, score))) % 10**8}",
        "url": url,
        "score": score,
        "subreddit": subreddit,
        "title": title,
        "is_self": False,
        "author": "someone",
        "created_utc": 1546300800,
    }
    post.update(extra)
    return post


def write_dump(path, lines: list, compress: bool | None = None) -> None:
    """Write a Pushshift-style dump: dicts become JSON lines, strings are written as they are."""
    data = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines).encode("utf-8")
    if compress if compress is not None else str(path).endswith(".zst"):
        data = zstandard.ZstdCompressor(level=3).compress(data)
    path.write_bytes(data)
