"""Numbers in an answer that no tool produced (issue 13: "every number comes from a tool").

`claimed_numbers(answer, question)` lists the quantities an answer states (not names such as
Llama-3.1-8B / A100 / ZeRO-3, list markers, step numbers, years, or the question's own numbers);
`grounded(claim, tool_numbers(texts))` says whether one of them appears in the tool outputs at
the answer's precision (GB<->GiB, fraction<->%, k/M scales). The agent uses them to keep a reply
with invented figures from reaching the person; `bench/agent_eval.py` scores answers with them.
"""

from __future__ import annotations

import math
import re

_UNIT = r"(?:GiB|GB|G|MiB|MB|TiB|TB|K|k|M|B|bn|h|hr|hrs|hours?|min|mins|s|sec|ms|x|×|%|tok|tokens?)"
_TOKEN = re.compile(r"[A-Za-z0-9_./+-]+")
_UNIT_TOKEN = re.compile(rf"^[~≈+-]?\d[\d,]*(?:\.\d+)?{_UNIT}?[.,]?$")
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?:\s?(k|K|M|B|bn)\b)?")
_LIST_MARKER = re.compile(r"(?m)^[ \t>]*(?:[-*+][ \t]+)?(?:#+[ \t]*)?(?:\*\*)?\d{1,2}[.)](?=\s|\*\*)")
_ORDINAL = re.compile(r"(?i)\b(?:step|option|method|approach|phase|choice|setup|plan|no\.|#)\s*\d{1,2}\b")
_RAW = re.compile(r"(?:(?<![\w.])-)?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_SCALE = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "bn": 1e9}


def _identifier(tok: str) -> bool:
    """A token with letters and digits that is a name (Llama-3.1-8B, A100, bf16, ZeRO-3, q_proj), not a quantity (24GB, 3.5h)."""
    tok = tok.strip(".,")
    if not re.search(r"\d", tok) or not re.search(r"[A-Za-z]", tok):
        return False
    return not _UNIT_TOKEN.match(tok)


def claimed_numbers(answer: str, question: str = "") -> list[dict]:
    """The numbers an answer claims: [{"text", "value", "decimals", "scale", "percent"}], minus the question's own numbers."""
    text = re.sub(r"https?://\S+", " ", answer or "")
    text = _LIST_MARKER.sub(" ", text)
    text = _ORDINAL.sub(" ", text)
    text = _TOKEN.sub(lambda m: " " * len(m.group()) if _identifier(m.group()) else m.group(), text)
    asked = question_numbers(question)
    out = []
    for m in _NUMBER.finditer(text):
        whole, frac, scale = m.group(1), m.group(2) or "", m.group(3)
        value = float(whole.replace(",", "") + frac)
        if scale:
            value *= _SCALE[scale]
        if not frac and not scale and 1900 <= value <= 2100:  # a year
            continue
        if any(math.isclose(value, a, rel_tol=1e-9) for a in asked):
            continue
        tail = text[m.end():m.end() + 2]
        out.append({"text": m.group(0), "value": value, "decimals": len(frac) - 1 if frac else 0,
                    "scale": _SCALE.get(scale or "", 1), "percent": tail.lstrip().startswith("%")})
    return out


def question_numbers(question: str) -> set[float]:
    """Every number written in the question, inside names too (8 and 3.1 of Llama-3.1-8B), with k/M expanded."""
    nums: set[float] = set()
    for m in re.finditer(r"(\d+(?:\.\d+)?)\s?([kKM])?(?![\d.])", question or ""):
        v = float(m.group(1))
        nums.add(v)
        if m.group(2):
            nums.add(v * _SCALE[m.group(2)])
    for m in re.finditer(r"\d+", question or ""):
        nums.add(float(m.group()))
    return nums


def tool_numbers(texts: list[str]) -> list[float]:
    out = []
    for t in texts:
        # digit runs of ids (a uuid's "2e345") can read as inf: no answer number matches those
        out.extend(v for v in (float(x) for x in _RAW.findall(t or "")) if math.isfinite(v))
    return out


def grounded(claim: dict, tools: list[float]) -> bool:
    """A claimed number matches a tool number at the answer's precision (also GB<->GiB, fraction<->%, k/M scale)."""
    v, d = claim["value"], claim["decimals"]
    tol = 0.5 * 10 ** (-d) * claim["scale"] + 1e-9
    candidates = []
    for t in tools:
        t = abs(t)  # claims are read without their sign ("headroom -2.8 GiB" claims 2.8)
        candidates += [t, t * 1.073741824, t / 1.073741824]
        if claim["percent"]:
            candidates.append(t * 100)
    for c in candidates:
        if abs(c - v) <= tol or (d == 0 and claim["scale"] == 1 and math.floor(c) == v):
            return True
    return False


def ungrounded_numbers(answer: str, question: str, tool_texts: list[str]) -> list[str]:
    """The numbers `answer` states that appear in no tool output (nor in the question)."""
    numbers = tool_numbers(tool_texts)
    return [c["text"] for c in claimed_numbers(answer, question) if not grounded(c, numbers)]


# verdict and language of an answer

_POS = re.compile(r"(?i)\b(fits?|will fit|fitting|yes|feasible|possible|enough (?:memory|vram)|can (?:fine-?tune|train|run|do))\b|가능|들어갑|들어간|충분|할 수 있")
_NEG = re.compile(r"(?i)(does ?n[o']t fit|won'?t fit|will not fit|not fit|too (?:big|large)|out of memory|\bOOM\b|not enough|exceeds?|insufficient|cannot|can'?t)|불가능|부족|초과|안 들어|들어가지 않|어렵")


def verdict(answer: str) -> dict:
    pos, neg = bool(_POS.search(answer or "")), bool(_NEG.search(answer or ""))
    return {"positive": pos, "negative": neg, "any": pos or neg}


def hangul_ratio(text: str) -> float:
    hangul = len(re.findall(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]", text or ""))
    latin = len(re.findall(r"[A-Za-z]", text or ""))
    return round(hangul / (hangul + latin), 3) if hangul + latin else 0.0
