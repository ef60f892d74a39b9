"""Web search for the agent (model cards of brand-new models, library facts): ddgs, bounded in time.

Results are data, never instructions: each is `{title, url, snippet, source: "web"}` and the
agent tool that wraps this says so to the model. Offline, rate-limited or slow searches
raise `WebSearchError` with one clear line; the agent sees it as an observation.
"""

from __future__ import annotations

import threading

from tools.schemas import TunepilotError

# One backend, not "auto": "auto" tries several engines one after another (12 s on a
# black-holed network); one backend plus a wall-clock bound keeps a search under `timeout`.
DEFAULT_BACKEND = "duckduckgo"
MAX_RESULTS = 10
SNIPPET_CHARS = 400


class WebSearchError(TunepilotError):
    """Web search could not run (offline, rate-limited, timed out)."""


def _clean(text: object, limit: int) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def web_search(query: str, max_results: int = 5, timeout: float = 5.0, *, backend: str = DEFAULT_BACKEND) -> list[dict]:
    """Search the web; returns up to max_results dicts {title, url, snippet, source: 'web'} or raises WebSearchError."""
    if not isinstance(query, str) or not query.strip():
        raise WebSearchError("query is empty: give a few keywords, e.g. 'Qwen3-4B config.json hidden_size'")
    if not 1 <= int(max_results) <= MAX_RESULTS:
        raise WebSearchError(f"max_results must be between 1 and {MAX_RESULTS}, got {max_results}")
    try:
        from ddgs import DDGS
        from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException
    except ImportError:
        raise WebSearchError("web search unavailable: the 'ddgs' package is not installed (pip install 'tunepilot[agent]')") from None

    box: dict = {}

    def _run() -> None:
        try:
            box["rows"] = DDGS(timeout=max(1, int(timeout))).text(query.strip(), max_results=int(max_results), backend=backend)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=_run, name="tunepilot-web-search", daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    if worker.is_alive():
        raise WebSearchError(f"web search unavailable: no answer within {timeout:g} s (offline or blocked network)")
    err = box.get("error")
    if isinstance(err, RatelimitException):
        raise WebSearchError("web search unavailable: rate-limited by the search engine; try again in a minute")
    if isinstance(err, TimeoutException):
        raise WebSearchError(f"web search unavailable: timed out after {timeout:g} s")
    if isinstance(err, DDGSException):
        msg = _clean(err, 160)
        if "no results" in msg.lower():
            return []
        raise WebSearchError(f"web search unavailable: offline or unreachable ({msg})")
    if isinstance(err, OSError):
        raise WebSearchError(f"web search unavailable: offline ({_clean(err, 160)})")
    if err is not None:
        raise err
    results = []
    for row in box.get("rows") or []:
        url = row.get("href") or row.get("url") or ""
        if not url:
            continue
        results.append({
            "title": _clean(row.get("title"), 200),
            "url": url,
            "snippet": _clean(row.get("body") or row.get("snippet"), SNIPPET_CHARS),
            "source": "web",
        })
    return results[: int(max_results)]
