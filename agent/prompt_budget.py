"""How many tokens the agent's first prompt costs (system prompt + tool schemas), without a tokenizer.

No tokenizer of an open model is available offline here (tiktoken downloads its encodings
from the web; Hugging Face tokenizers need the Hub), so tokens are counted with a stated,
conservative approximation: one token per 3.5 characters of the JSON the server receives.
English prose and JSON tokenise at about 4 characters per token with the Llama / Qwen /
GPT-4 tokenizers, so this over-counts by ~15%, which is the safe side for a budget.

    python -m agent.prompt_budget      # prints the sizes, e.g. "first prompt ~2,450 tokens"
"""

from __future__ import annotations

import json
import math
from datetime import date

CHARS_PER_TOKEN = 3.5
FIRST_PROMPT_BUDGET_TOKENS = 3000  # issue 13: system prompt + tool schemas must stay under this
ANSWER_RESERVE_TOKENS = 1024  # room left in the context for the model's reply


def approx_tokens(text: str) -> int:
    """Tokens of `text` by the documented approximation (chars / 3.5, rounded up)."""
    return int(math.ceil(len(text or "") / CHARS_PER_TOKEN))


def tool_schemas(tools) -> list[dict]:
    """The tools as the OpenAI-compatible server receives them."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return [convert_to_openai_tool(t) for t in tools]


def first_prompt_tokens(system_prompt: str, tools) -> int:
    """Approximate tokens of the system prompt plus every tool schema (what is sent before the user says anything)."""
    return approx_tokens(system_prompt) + approx_tokens(json.dumps(tool_schemas(tools), ensure_ascii=False))


def report() -> dict:
    """Sizes of the current prompt: characters and approximate tokens, per part and per tool."""
    from prompts import render
    from tools.agent_tools import TOOLS

    system = render("system", today=date.today().isoformat())
    schemas = tool_schemas(TOOLS)
    per_tool = {s["function"]["name"]: approx_tokens(json.dumps(s, ensure_ascii=False)) for s in schemas}
    return {
        "system_prompt_chars": len(system),
        "system_prompt_tokens": approx_tokens(system),
        "tool_schema_chars": len(json.dumps(schemas, ensure_ascii=False)),
        "tool_schema_tokens": approx_tokens(json.dumps(schemas, ensure_ascii=False)),
        "first_prompt_tokens": first_prompt_tokens(system, TOOLS),
        "budget_tokens": FIRST_PROMPT_BUDGET_TOKENS,
        "per_tool_tokens": per_tool,
        "method": f"chars / {CHARS_PER_TOKEN} (conservative; no offline tokenizer)",
    }


if __name__ == "__main__":
    r = report()
    print(f"system prompt {r['system_prompt_chars']:,} chars ~{r['system_prompt_tokens']:,} tokens")
    print(f"tool schemas  {r['tool_schema_chars']:,} chars ~{r['tool_schema_tokens']:,} tokens")
    for name, n in r["per_tool_tokens"].items():
        print(f"  {name:<24} ~{n:,} tokens")
    print(f"first prompt ~{r['first_prompt_tokens']:,} tokens (budget {r['budget_tokens']:,}; {r['method']})")
