"""Tool calls a model wrote as text: recognise them and make them real tool calls.

Small local models behind OpenAI-compatible servers often answer a tool call as text in the
message content instead of the API's `tool_calls` (llama.cpp with Qwen2.5's own chat template
returns a fenced JSON block; others use <tool_call> tags or bare JSON):

    ```json
    {"name": "plan_training", "arguments": {"model": "meta-llama/Llama-3.1-8B", "gpu": "RTX 4090"}}
    ```

`text_tool_calls_middleware()` (in the agent's middleware list) looks at every model reply
that has no `tool_calls`: a call written as text whose name is one of the agent's tools
becomes a real tool call (the rest of the text stays as the message content); a call that
names no tool of the agent, or whose JSON cannot be read, is not run, and a clear line saying
so is added to the reply instead of leaving the person with raw JSON or silence.
Plain answers (even ones holding JSON that is not a call, e.g. a config) are left alone.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

_NAME_KEYS = ("name", "tool", "tool_name", "function", "recipient_name")
_ARG_KEYS = ("arguments", "parameters", "args", "input", "tool_input", "kwargs")

# [tool_call]...[/tool_call], <tool_call>...</tool_call>, <|tool_call|>...; the closing tag may be missing at the end
_TAGGED = re.compile(r"(?:<\|?tool_call\|?>|\[tool_call\]|<function_call>)\s*(.*?)\s*(?:</\|?tool_call\|?>|\[/tool_call\]|</function_call>|<\|/?tool_call\|?>|\Z)",
                     re.S | re.I)
_FENCED = re.compile(r"```[ \t]*(?:json|tool_call|tool|javascript|js|python)?[ \t]*\n?(.*?)```", re.S | re.I)


@dataclass
class TextCalls:
    """What a reply's text held: calls to run, calls that cannot run (with why), and the text without them."""

    calls: list[dict] = field(default_factory=list)  # [{"name", "args"}]
    problems: list[str] = field(default_factory=list)  # one line each
    text: str = ""

    @property
    def found(self) -> bool:
        return bool(self.calls or self.problems)


def _loads(blob: str) -> Any:
    blob = blob.strip().rstrip(";")
    try:
        return json.loads(blob)
    except ValueError:
        pass
    try:  # Python-style dicts: single quotes, True/False/None
        return ast.literal_eval(blob)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    try:  # JSON with true/false/null written in single-quoted Python style
        fixed = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", blob)))
        return ast.literal_eval(fixed)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError("not JSON") from None


def _objects(text: str) -> Iterable[tuple[int, int, str]]:
    """Top-level balanced {...} / [...] spans of text (strings respected): (start, end, blob)."""
    i, n = 0, len(text)
    while i < n:
        if text[i] not in "{[":
            i += 1
            continue
        depth, j, quote, esc = 0, i, "", False
        while j < n:
            ch = text[j]
            if quote:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == quote:
                    quote = ""
            elif ch in "\"'":
                quote = ch
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    yield i, j + 1, text[i:j + 1]
                    break
            j += 1
        i = j + 1 if depth == 0 else i + 1


def _as_call(obj: Any) -> tuple[str, Any] | None:
    """(name, arguments) when obj is shaped like a tool call, else None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI's {"type": "function", "function": {...}}
        return _as_call(obj["function"])
    name = next((obj[k] for k in _NAME_KEYS if isinstance(obj.get(k), str) and obj[k].strip()), None)
    if name is None:
        return None
    args = next((obj[k] for k in _ARG_KEYS if k in obj), None)
    if args is None:
        rest = {k: v for k, v in obj.items() if k not in _NAME_KEYS and k not in ("type", "id")}
        if rest:  # {"name": ..., "model": ..., "gpu": ...}: arguments written inline
            args = rest
        elif set(obj) - {"name", "type", "id"}:
            return None
        else:
            args = {}
    return name.strip(), args


def _calls_in(blob: str) -> tuple[list[tuple[str, Any]], bool]:
    """Calls in one JSON blob (an object or a list of them) and whether it parsed."""
    try:
        obj = _loads(blob)
    except ValueError:
        return [], False
    items = obj if isinstance(obj, list) else [obj]
    return [c for c in (_as_call(x) for x in items) if c is not None], True


def _args(name: str, raw: Any) -> tuple[dict | None, str]:
    if isinstance(raw, str):
        if not raw.strip():
            return {}, ""
        try:
            raw = _loads(raw)
        except ValueError:
            return None, f"the model wrote a call to {name} as text but its arguments are not valid JSON ({raw[:80]!r})"
    if not isinstance(raw, dict):
        return None, f"the model wrote a call to {name} as text but its arguments are not an object ({str(raw)[:80]!r})"
    return raw, ""


def find_text_tool_calls(text: str, tool_names: Iterable[str]) -> TextCalls:
    """Tool calls written in `text` (tagged, fenced JSON, or bare JSON with a name and arguments)."""
    names = {n for n in tool_names if n}
    out = TextCalls(text=text or "")
    if not text or not text.strip():
        return out
    spans: list[tuple[int, int]] = []
    found: list[tuple[str, Any]] = []
    broken: list[str] = []

    def take(pattern: re.Pattern, strict: bool) -> None:
        for m in pattern.finditer(text):
            if any(s <= m.start() < e for s, e in spans):
                continue
            inner = m.group(1)
            calls, parsed = _calls_in(inner)
            if not parsed:  # e.g. two objects in one block, or prose around the JSON: look inside
                calls = [c for _s, _e, blob in _objects(inner) for c in _calls_in(blob)[0]]
                parsed = bool(calls)
            if calls:
                found.extend(calls)
                spans.append((m.start(), m.end()))
            elif strict and inner.strip():
                hit = next((n for n in names if re.search(rf"[\"']{re.escape(n)}[\"']", inner)), None)
                broken.append(f"the model wrote a tool call{f' to {hit}' if hit else ''} as text that could not be read: "
                              f"{' '.join(inner.split())[:100]!r}")
                spans.append((m.start(), m.end()))

    take(_TAGGED, strict=True)  # tags are always meant as calls
    take(_FENCED, strict=False)  # a fenced block may be an ordinary code sample
    for s, e, blob in _objects(text):  # bare JSON: only with both a name and arguments
        if any(a <= s < b for a, b in spans):
            continue
        try:
            obj = _loads(blob)
        except ValueError:
            continue
        items = obj if isinstance(obj, list) else [obj]
        calls = [c for x in items if isinstance(x, dict) and (any(k in x for k in _ARG_KEYS) or isinstance(x.get("function"), dict))
                 for c in [_as_call(x)] if c is not None]
        if calls:
            found.extend(calls)
            spans.append((s, e))
    for name, raw in found:
        if name not in names:
            # functions.plan_training / tunepilot.plan_training -> plan_training
            short = name.rsplit(".", 1)[-1]
            if short in names:
                name = short
            else:
                out.problems.append(f"the model asked for a tool named {name!r} (written as text); tunepilot has no such tool, "
                                    f"so nothing ran (tools: {', '.join(sorted(names))})")
                continue
        args, problem = _args(name, raw)
        if problem:
            out.problems.append(problem)
        else:
            out.calls.append({"name": name, "args": args})
    out.problems.extend(broken)
    if spans:
        keep, last = [], 0
        for s, e in sorted(spans):
            keep.append(text[last:s])
            last = max(last, e)
        keep.append(text[last:])
        out.text = re.sub(r"\n{3,}", "\n\n", "".join(keep)).strip()
    return out


def recover_tool_calls(message: Any, tool_names: Iterable[str]) -> Any:
    """An AIMessage with no tool_calls whose text holds tool calls -> the same message with real ones (or a clear line)."""
    from langchain_core.messages import AIMessage

    if not isinstance(message, AIMessage) or message.tool_calls:
        return message
    content = message.content
    if isinstance(content, list):
        content = "".join(b if isinstance(b, str) else b.get("text", "") for b in content if isinstance(b, (str, dict)))
    if not isinstance(content, str) or not content.strip():
        return message
    found = find_text_tool_calls(content, tool_names)
    if not found.found:
        return message
    kwargs = {"id": message.id, "name": message.name, "response_metadata": {**(message.response_metadata or {}),
              "tunepilot_text_tool_calls": len(found.calls)}, "additional_kwargs": dict(message.additional_kwargs or {}),
              "usage_metadata": message.usage_metadata}
    if found.calls:
        calls = [{"name": c["name"], "args": c["args"], "id": f"call_text_{uuid.uuid4().hex[:12]}", "type": "tool_call"}
                 for c in found.calls]
        text = found.text
        if found.problems:
            text = (text + "\n\n" if text else "") + "\n".join(f"({p})" for p in found.problems)
        return AIMessage(content=text, tool_calls=calls, **kwargs)
    lines = "\n".join(f"({p})" for p in found.problems)
    text = (found.text + "\n\n" + lines) if found.text else lines
    return AIMessage(content=text, **kwargs)


def _tool_name(tool: Any) -> str:
    if isinstance(tool, dict):
        return str(tool.get("name") or (tool.get("function") or {}).get("name") or "")
    return str(getattr(tool, "name", "") or "")


def text_tool_calls_middleware():
    """Agent middleware: a model reply with a tool call written as text becomes a real tool call (see the module doc)."""
    from langchain.agents.middleware import ModelResponse, wrap_model_call

    def _fix(request, response):
        names = {_tool_name(t) for t in (getattr(request, "tools", None) or [])}
        if isinstance(response, ModelResponse):
            return ModelResponse(result=[recover_tool_calls(m, names) for m in response.result],
                                 structured_response=response.structured_response)
        return recover_tool_calls(response, names)

    @wrap_model_call
    def tunepilot_text_tool_calls(request, handler):
        """Turn tool calls the model wrote as text into real tool calls."""
        return _fix(request, handler(request))

    return tunepilot_text_tool_calls
