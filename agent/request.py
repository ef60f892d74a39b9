"""What the person asked for, read from their own words (issue 13: "the user's request is kept").

A small model routes well enough but drops or invents the figures: seq_len 2048 for "about 1k tokens",
method "auto" for "Full fine-tuning", hardware "local" for "T4 한 장", "mistral-7b" that the catalog
did not know. `read_request(text)` pulls out what the message itself says — the model (catalog names
as people write them), the GPUs with their count, the method(s), tokens per example, number of
examples, micro-batch, LoRA rank, sharding, whether a script or a trial was asked for, the
language — and `correct_args(tool, args, request, first=...)` puts those values into a tool call
whose arguments lost or changed them, returning notes that say what was changed and why.

Only what the message states is used; nothing is guessed. A value the model changed on purpose later
in a turn (a what-if, one change at a time) is left alone: the full correction applies to the first
engine call of a turn, later calls only get what is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from tools.gpus import hardware_in_text

SETUP_TOOLS = ("plan_training", "estimate_memory", "write_training_script", "make_peft_config", "run_trial")
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_ID_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]*")


@dataclass
class Request:
    """The figures a person's message states (None / empty where it says nothing)."""

    text: str
    models: list[str] = field(default_factory=list)  # catalog / Hub ids, in the order named
    hardware: Optional[str] = None  # e.g. "2x NVIDIA A100 SXM 80GB"
    gpu_name: Optional[str] = None
    num_gpus: Optional[int] = None
    methods: list[str] = field(default_factory=list)  # full / lora / qlora / dora, in the order named
    seq_len: Optional[int] = None
    examples: Optional[int] = None
    micro_batch: Optional[int] = None
    r: Optional[int] = None
    fsdp: bool = False
    zero_stages: list[int] = field(default_factory=list)
    wants_script: bool = False
    wants_trial: bool = False
    price_given: bool = False  # a price per GPU-hour ($2/h, 2 dollars an hour, 시간당 ...원)
    total_tokens: Optional[int] = None  # the data's size in tokens ("50M tokens", "1.2B tokens of text")
    objective: Optional[str] = None  # dpo / kto / reward / grpo when the message names one
    language: str = "en"  # "ko" for Korean

    @property
    def method(self) -> Optional[str]:
        return self.methods[0] if len(self.methods) == 1 else None

    @property
    def model(self) -> Optional[str]:
        return self.models[0] if len(self.models) == 1 else None

    def stated(self) -> dict:
        """What the message states, for notes and logs."""
        out = {k: getattr(self, k) for k in ("hardware", "seq_len", "examples", "micro_batch", "r")}
        out |= {"model": self.model, "method": self.method, "methods": self.methods if len(self.methods) > 1 else None}
        return {k: v for k, v in out.items() if v not in (None, [], "")}


def _amount(num: str, suffix: str = "") -> Optional[int]:
    try:
        value = float(num.replace(",", ""))
    except ValueError:
        return None
    scale = {"k": 1000, "m": 1_000_000, "b": 1_000_000_000}.get(suffix.lower()[:1], 1)
    return int(round(value * scale))


def _tokens(num: str, suffix: str = "") -> Optional[int]:
    """Tokens per example: "1k" is 1024, "4096" is 4096, "8k" 8192 (sequence lengths count in powers of two)."""
    if suffix.lower().startswith("k"):
        try:
            return int(round(float(num.replace(",", "")) * 1024))
        except ValueError:
            return None
    return _amount(num)


def _find_models(text: str) -> list[str]:
    from tools.models import ModelNotFoundError, lookup_model

    tokens = [m.group(0).rstrip(".,;:!?)") for m in _ID_TOKEN.finditer(text)]
    found: list[str] = []
    used: set[int] = set()
    for n in (1, 2, 3):  # single tokens first ("Llama-3.1-8B"), then "Llama 3.1 8B"
        for i in range(len(tokens) - n + 1):
            if any(j in used for j in range(i, i + n)):
                continue
            words = tokens[i:i + n]
            if n > 1 and not all(len(w) <= 8 for w in words):
                continue
            ref = "-".join(words)
            if not any(c.isdigit() for c in ref) or not any(c.isalpha() for c in ref):
                continue
            try:
                spec = lookup_model(ref, hub=False)
            except (ModelNotFoundError, ValueError, OSError):
                continue
            except Exception:  # noqa: BLE001 - an odd token is never a reason to fail the turn
                continue
            used.update(range(i, i + n))
            if spec.model_id not in found:
                found.append(spec.model_id)
    return found


def _find_methods(text: str) -> list[str]:
    low = text.lower()
    hits: list[tuple[int, str]] = []
    for m in re.finditer(r"\bq-?lora\b", low):
        hits.append((m.start(), "qlora"))
    for m in re.finditer(r"(?<![q\-])\blora\b", low):
        hits.append((m.start(), "lora"))
    for m in re.finditer(r"\bdora\b", low):
        hits.append((m.start(), "dora"))
    for m in re.finditer(r"\bfull[\s-]*(?:fine[\s-]*tun\w*|finetun\w*|ft\b|parameter|weights?)|\bfull\s+training|"
                         r"(?:풀|전체|전부)\s*(?:파인\s*튜닝|파라미터|학습)", low):
        hits.append((m.start(), "full"))
    out: list[str] = []
    for _pos, name in sorted(hits):
        if name not in out:
            out.append(name)
    return out


_SEQ = [
    re.compile(r"(?i)\b(?:seq(?:uence)?(?:[\s_-]*len(?:gth)?)?|max[\s_-]*(?:seq[\s_-]*)?len(?:gth)?|context(?:\s+length)?|ctx)"
               r"\s*(?:of|=|:|is)?\s*~?(\d[\d,]*(?:\.\d+)?)\s*(k)?\b"),
    re.compile(r"(?i)(?:about|around|~|≈|roughly|up to)?\s*(\d[\d,]*(?:\.\d+)?)\s*(k)?\s*[- ]?tokens?\s*"
               r"(?:each|per\s+(?:example|sample|sequence|ticket|row|document)|long|apiece)"),
    re.compile(r"(?i)(\d[\d,]*(?:\.\d+)?)\s*(k)?\s*(?:토큰)"),
]
_EXAMPLES = re.compile(r"(?i)~?\s*(\d[\d,]*(?:\.\d+)?)\s*(k|m)?\s+(?:(?!tokens?\b|per\b|each\b)[a-z-]+\s+){0,2}"
                       r"(?:examples?|samples?|tickets?|rows?|conversations?|dialogues?|documents?|docs|pairs?|prompts?|"
                       r"records?|instructions?|questions?|texts?|emails?|reviews?|chats?)\b")
_OBJECTIVES = (("grpo", r"\bgrpo\b|\brl\b with a reward function|reinforcement learning with a reward"),
               ("dpo", r"\bdpo\b|direct preference optimi"), ("kto", r"\bkto\b"),
               ("reward", r"\breward model(?:ing)?\b|보상 모델"))
_BATCH = re.compile(r"(?i)\b(?:micro[\s_-]*)?batch(?:[\s_-]*size)?\s*(?:of|=|:)?\s*(\d{1,4})\b")
_RANK = re.compile(r"(?i)(?:\br\s*=\s*|\brank\s*(?:=|of)?\s*)(\d{1,4})\b")


def read_request(text: str) -> Request:
    """The figures the person's message states (see the module docstring)."""
    text = text or ""
    req = Request(text=text)
    req.language = "ko" if _HANGUL.search(text) else "en"
    try:
        req.models = _find_models(text)
    except Exception:  # noqa: BLE001 - reading the request is best effort
        req.models = []
    try:
        req.hardware, req.gpu_name, req.num_gpus = hardware_in_text(text)
    except Exception:  # noqa: BLE001
        pass
    req.methods = _find_methods(text)
    for pattern in _SEQ:
        m = pattern.search(text)
        if m:
            value = _tokens(m.group(1), m.group(2) or "")
            if value and 16 <= value <= 1_048_576:
                req.seq_len = value
                break
    m = _EXAMPLES.search(text)
    if m:
        value = _amount(m.group(1), m.group(2) or "")
        if value and value >= 10:
            req.examples = value
    m = re.search(r"(?i)(\d[\d,]*(?:\.\d+)?)\s*(k|m|b|million|billion)?\s+(?:training\s+)?tokens\b"
                  r"(?!\s*(?:per|each|long|apiece|a\s+(?:sample|example)))", text)
    if m:
        total = _amount(m.group(1), {"million": "m", "billion": "b"}.get((m.group(2) or "").lower(), m.group(2) or ""))
        if total and total >= 100_000:  # a data size, not a length
            req.total_tokens = total
    m = _BATCH.search(text)
    if m:
        req.micro_batch = int(m.group(1))
    m = _RANK.search(text)
    if m:
        req.r = int(m.group(1))
    low = text.lower()
    req.price_given = bool(re.search(r"[$€£₩¥]\s*\d|\d\s*(?:usd|eur|dollars?|euros?|원|달러)|per\s+(?:gpu[\s-]*)?h(?:ou)?r|/\s*(?:gpu[\s-]*)?h(?:ou)?r?\b|"
                                     r"시간당", low))
    req.fsdp = "fsdp" in low
    for name, pattern in _OBJECTIVES:
        if re.search(pattern, low):
            req.objective = name
            break
    req.zero_stages = sorted({int(s) for s in re.findall(r"(?i)zero[\s_-]*(?:stage[\s_-]*)?([123])\b", text)})
    req.wants_script = bool(re.search(r"(?i)\b(?:write|give|generate|make|create)\b[^.?!]{0,40}\bscript\b|\btrain(?:ing)?\.py\b|"
                                      r"\btraining script\b|스크립트", text))
    req.wants_trial = bool(re.search(r"(?i)\b(?:trial|test|dry)[\s-]*run\b|\brun (?:a |the )?(?:trial|test)\b|\btry it\b|"
                                     r"시험\s*(?:실행|학습)|테스트\s*(?:실행|학습)", text))
    return req


# ------------------------------------------------------------------------------------------
# Putting the person's figures into a tool call
# ------------------------------------------------------------------------------------------


def _same_model(value: Any, model_id: str) -> bool:
    from tools.models import lookup_model

    if not isinstance(value, str) or not value.strip():
        return False
    try:
        return lookup_model(value, hub=False).model_id == model_id
    except Exception:  # noqa: BLE001 - an unknown name is simply not the same model
        return False


def _hardware_of(value: Any):
    from tools.agent_tools import _hardware

    if not isinstance(value, str) or not value.strip() or _is_local(value):
        return None
    try:
        return _hardware(value)
    except Exception:  # noqa: BLE001
        return None


# the words by which a message asks for a knob; a knob the first call of a turn sets although the message
# names none of them is the model's own invention (a 1.5B model fills every knob it is shown: fp16 on a 4090,
# gradient_checkpointing false, optim "adamw", fsdp false ...) and is left out
_KNOB_WORDS = {
    "r": r"\br\s*=|\brank|\br\d|랭크", "lora_alpha": r"alpha", "lora_dropout": r"dropout",
    "target_modules": r"target|_proj\b|all[- ]linear|attention (?:layers|modules|projections)|\bmlp\b",
    "per_device_train_batch_size": r"batch|배치", "gradient_accumulation_steps": r"accum|누적",
    "gradient_checkpointing": r"checkpoint|체크포인",
    "optim": r"optim|adam|\bsgd\b|adafactor|\blion\b|8[- ]?bit|paged|옵티마이저",
    "precision": r"fp16|bf16|fp32|float16|bfloat16|float32|precision|half|정밀도",
    "bf16": r"bf16|bfloat16|precision", "fp16": r"fp16|float16|half|precision",
    "zero_stage": r"zero|deepspeed", "fsdp": r"fsdp|shard", "offload": r"offload|오프로드",
    "attn_implementation": r"attention|flash|sdpa|eager|\bfa2\b|어텐션",
    "packing": r"pack|패킹", "learning_rate": r"\blr\b|learning[- ]rate|학습률", "num_train_epochs": r"epoch|에폭|에포크",
    "load_in_4bit": r"4[- ]?bit|qlora|nf4", "bnb_4bit_quant_type": r"nf4|fp4|quant",
    "objective": r"\bdpo\b|grpo|\bkto\b|orpo|reward|preference|\brl\b|선호",
    "use_vllm": r"vllm", "num_generations": r"generation", "max_length": r"seq|length|context|tokens?\b|토큰|길이",
    "neftune_noise_alpha": r"neftune", "use_chat_template": r"chat|template", "dataset_text_field": r"field|column",
}


def _invented_knobs(setup: dict, req: Request) -> list[str]:
    """The knobs of `setup` that the message asks for in no word (see _KNOB_WORDS)."""
    from tools.agent_tools import _knob_name

    low = req.text.lower()
    out = []
    for key in setup:
        words = _KNOB_WORDS.get(_knob_name(key))
        if words and not re.search(words, low):
            out.append(key)
    return out


def _is_local(value: Any) -> bool:
    from tools.agent_tools import LOCAL_WORDS

    return isinstance(value, str) and value.strip().lower() in LOCAL_WORDS


def _local_gpu() -> bool:
    from tools.agent_tools import _hardware

    try:
        _hardware("local")
        return True
    except Exception:  # noqa: BLE001 - no GPU (or no driver): nothing to detect
        return False


def correct_args(tool: str, args: dict, req: Request, *, first: bool) -> tuple[dict, list[str]]:
    """`args` with the person's stated figures put back where the call lost or changed them, and a note per change.

    `first`: the first engine call of this turn (then what the call changed is corrected too; later calls
    are what-ifs the model may make on purpose, and only get what is missing or unusable)."""
    if tool not in SETUP_TOOLS:
        return args, []
    new = dict(args or {})
    notes: list[str] = []
    setup = dict(new.get("setup") or {}) if isinstance(new.get("setup"), dict) else None

    def put(key: str, value: Any, why: str) -> None:
        old = new.get(key)
        new[key] = value
        notes.append(f"{key} {value!r} from the person's message ({why}{'' if old in (None, '') else f'; the call had {old!r}'})")

    # the model: named once in the message, and the call names none, an unknown one, or (first call) another
    has_model_arg = tool in ("plan_training", "estimate_memory") or "model" in new
    if req.model and has_model_arg:
        value = new.get("model")
        if value in (None, "") and tool == "plan_training":
            put("model", req.model, "the call named none")
        elif value not in (None, "") and not _same_model(value, req.model):
            from tools.models import lookup_model

            try:
                lookup_model(str(value), hub=False)
                known = True
            except Exception:  # noqa: BLE001
                known = False
            if not known or first:
                put("model", req.model, "the call's model is not the one named" if known else "the call's model is unknown")
    # the GPUs
    if req.hardware:
        value = new.get("hardware")
        hw = _hardware_of(value)
        if value in (None, "") and tool == "plan_training":
            put("hardware", req.hardware, "the call named none")
        elif value not in (None, "") and hw is None:
            put("hardware", req.hardware, "the call's hardware is not a GPU the message names")
        elif hw is not None and first and (hw.gpu.name != req.gpu_name or hw.num_gpus != req.num_gpus):
            put("hardware", req.hardware, "the message names these GPUs")
    elif tool == "estimate_memory" and _is_local(new.get("hardware")) and not _local_gpu():
        # no GPU named and none here: memory only, with no verdict, rather than an error the model retries
        notes.append(f"hardware {new.pop('hardware')!r} left out: the message names no GPU and this machine has none "
                     "(memory only; ask the person which GPU)")
    # tokens per example
    if req.seq_len and tool in ("plan_training", "estimate_memory"):
        value = new.get("seq_len")  # estimate_memory without one keeps the current setup's: filled on the first call only
        if (value in (None, "") and (first or tool == "plan_training")) or (first and value != req.seq_len):
            put("seq_len", req.seq_len, "tokens per example as stated")
    # number of examples (plan_training's time)
    if req.examples and tool == "plan_training":
        if new.get("dataset_examples") in (None, "") or (first and new.get("dataset_examples") != req.examples):
            put("dataset_examples", req.examples, "the number of examples as stated")
        if new.get("dataset_tokens") and first:
            notes.append(f"dataset_tokens {new.pop('dataset_tokens')!r} left out: the person gave the number of examples "
                         "(tokens follow from examples x seq_len)")
    # figures the message does not state and the call invented (a price makes up a cost, a data size a time)
    if tool == "plan_training" and new.get("price_per_gpu_hour") not in (None, "") and not req.price_given:
        notes.append(f"price_per_gpu_hour {new.pop('price_per_gpu_hour')!r} left out: the person gave no price")
    if tool == "plan_training" and first and not req.examples:
        if new.get("dataset_examples") not in (None, ""):
            notes.append(f"dataset_examples {new.pop('dataset_examples')!r} left out: the person gave no number of examples")
        if new.get("dataset_tokens") not in (None, "") and not req.total_tokens:
            notes.append(f"dataset_tokens {new.pop('dataset_tokens')!r} left out: the person gave no data size")
    # the objective (DPO, GRPO, ...) rides in plan_training's setup
    if req.objective and tool == "plan_training":
        setup = setup if setup is not None else {}
        if setup.get("objective") in (None, "", "sft") or (first and setup.get("objective") != req.objective):
            old = setup.get("objective")
            setup["objective"] = req.objective
            notes.append(f"setup.objective {req.objective!r} from the person's message" + ("" if old in (None, "") else f" (the call had {old!r})"))
    # the method
    if req.fsdp and tool == "plan_training" and (req.num_gpus or 0) > 1 and not new.get("fsdp"):
        # "with FSDP": the plan searches FSDP setups only (not the ZeRO ones it would also rank)
        new["fsdp"] = "shard_grad_op" if re.search(r"shard[\s_-]*grad[\s_-]*op", req.text.lower()) else "full_shard"
        notes.append(f"planned FSDP {new['fsdp']} only, as the person asked")
    if req.method:
        if tool == "plan_training":
            if new.get("method") in (None, "", "auto") or (first and new.get("method") != req.method):
                put("method", req.method, "the method asked for")
        elif tool == "estimate_memory" and first:
            setup = setup if setup is not None else {}
            if setup.get("method") != req.method:
                old = setup.get("method")
                setup["method"] = req.method
                notes.append(f"setup.method {req.method!r} from the person's message"
                             + ("" if old is None else f" (the call had {old!r})"))
    elif len(req.methods) > 1 and tool == "plan_training" and new.get("method") in (None, "", "auto"):
        new["compare_methods"] = list(req.methods)
        notes.append(f"compared {', '.join(req.methods)} as the person asked (one plan each)")
    # the person's own config: micro-batch and rank, first estimate of a turn only (an OOM rescue starts from it)
    if tool == "estimate_memory" and first:
        for key, value in (("per_device_train_batch_size", req.micro_batch), ("r", req.r)):
            if value:
                setup = setup if setup is not None else {}
                if setup.get(key) != value:
                    old = setup.get(key)
                    setup[key] = value
                    notes.append(f"setup.{key} {value} from the person's message" + ("" if old is None else f" (the call had {old!r})"))
    if setup is not None and first and req.text.strip():
        dropped = {k: setup.pop(k) for k in _invented_knobs(setup, req)}
        if dropped:
            notes.append("left out setup knobs the person did not ask for: "
                         + ", ".join(f"{k}={v!r}" for k, v in dropped.items()) + " (the setup's defaults apply)")
    if setup is not None and (setup or "setup" in new):
        new["setup"] = setup
    return new, notes
