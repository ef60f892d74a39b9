"""The agent's prompts: `prompts/<name>.md` files rendered by one function.

Prompt text never lives in Python strings. `render` uses jinja2 with `StrictUndefined`,
so a template that uses a variable the caller did not pass raises instead of silently
rendering an empty string.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(PROMPT_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def names() -> list[str]:
    """Names of every prompt file (without .md)."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.md"))


def render(name: str, **vars) -> str:
    """Render `prompts/<name>.md` with the given variables; a missing variable raises jinja2.UndefinedError."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"prompt name {name!r}: give a bare name such as 'system'")
    if not (PROMPT_DIR / f"{name}.md").is_file():
        raise FileNotFoundError(f"no prompt named {name!r} in {PROMPT_DIR} (have: {', '.join(names())})")
    return _environment().get_template(f"{name}.md").render(**vars).strip()
