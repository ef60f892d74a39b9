"""DeepSpeed ZeRO-3's gathered parameters: its PartitionedParameterCoordinator replayed over the step's trace.

ZeRO-3 does not gather a decoder block at a time (FSDP's unit): it gathers the parameters of each
SUBMODULE that owns parameters (every Linear, norm, embedding; LoRA's base_layer, lora_A and lora_B
apart) in a forward/backward pre-hook, and releases them in the post-hook. Which parameters are
gathered at each moment follows the rules of deepspeed/runtime/zero/partitioned_param_coordinator.py
(`fetch_sub_module`, `release_sub_module`, `__params_to_release`), replayed here on the recorded
trace of a training step (DeepSpeed records it in the first step and follows it from the second on):

- fetch: the submodule's parameters that are not available are all-gathered; its entries are popped
  from the parameter queue (the trace, one entry per (step, parameter)); then parameters are
  prefetched along the queue while the numel being prefetched stays below
  min(stage3_max_live_parameters - numel available, stage3_prefetch_bucket_size); a prefetched
  parameter is counted from the moment its all-gather is launched (its full buffer is allocated then);
- release (after the submodule's forward or backward): its parameters are partitioned again unless
  they are persistent (ds_persist: numel < stage3_param_persistence_threshold, gathered once at
  start and kept), or their next use was already consumed by a prefetch, or they occur again in the
  submodules of the trace within stage3_max_reuse_distance elements from the current step.

The trace is the model's module order (tools.analytic's block structure, the same shapes the dry run
builds): embedding, per block [input norm, attention linears, post-attention norm, MLP linears],
final norm, LM head; the backward reverses it, and under gradient checkpointing every block first
re-runs its forward (the recompute fires the forward hooks again) and then its backward. The
numel DeepSpeed counts is the stored one (a 4-bit Params4bit in bf16 quant storage holds numel/4
elements, numel/2 bytes). No torch here.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

# the trace's phases, named as the dry run's segments (tools.memory.segments.TRAIN_SEGMENTS)
FORWARD, BACKWARD_LOSS, BACKWARD, BACKWARD_TAIL = "forward", "backward-loss", "backward", "backward-tail"


@dataclass(frozen=True)
class Param:
    """One parameter as DeepSpeed sees it: a stable key, its ds_numel and its full (gathered) bytes."""

    key: str
    numel: int
    nbytes: int


@dataclass(frozen=True)
class Submodule:
    name: str
    params: tuple[Param, ...]


@dataclass
class Moment:
    """The state after one fetch (and its prefetch): what is gathered while the submodule computes."""

    step: int
    module: str
    phase: str
    gathered_numel: int  # non-persistent parameters available or in flight
    gathered_bytes: int  # the same, in bytes
    persistent_bytes: int  # ds_persist parameters (always gathered)
    fetched_numel: int = 0  # all-gathered at this step (the submodule's own and the prefetch)

    @property
    def total_bytes(self) -> int:
        return self.gathered_bytes + self.persistent_bytes


@dataclass(frozen=True)
class CoordinatorConfig:
    prefetch_bucket_size: float
    max_live_parameters: float
    max_reuse_distance: float
    param_persistence_threshold: float


def replay(trace: list[tuple[Submodule, str]], cfg: CoordinatorConfig) -> list[Moment]:
    """The coordinator's fetch / prefetch / release over a recorded trace of (submodule, phase)."""
    persist = {p.key: p for sub, _ in trace for p in sub.params if p.numel < cfg.param_persistence_threshold}
    persistent_bytes = sum(p.nbytes for p in persist.values())
    queue: deque[tuple[Param, int]] = deque((p, step) for step, (sub, _) in enumerate(trace) for p in sub.params)
    most_recent: dict[str, int] = defaultdict(lambda: -10 ** 12)
    available: dict[str, Param] = {}
    n_available = 0
    moments: list[Moment] = []

    fetched = 0

    def gather(p: Param) -> None:
        nonlocal n_available, fetched
        if p.key in persist or p.key in available:
            return
        available[p.key] = p
        n_available += p.numel
        fetched += p.numel

    for step, (sub, phase) in enumerate(trace):
        fetched = 0
        for p in sub.params:
            gather(p)
        # pop this submodule's own entries off the queue (those not already consumed by a prefetch)
        not_fetched = {p.key for p in sub.params if most_recent[p.key] < step}
        discarded: set[str] = set()
        while queue and len(discarded) < len(not_fetched):
            p, sid = queue.popleft()
            most_recent[p.key] = sid
            discarded.add(p.key)
        # prefetch along the trace
        budget = min(cfg.max_live_parameters - n_available, cfg.prefetch_bucket_size)
        if cfg.prefetch_bucket_size > 0:
            prefetching, numel = set(), 0
            while queue and numel < budget:
                p, sid = queue.popleft()
                do = p.key not in available and p.key not in persist and p.key not in prefetching
                most_recent[p.key] = max(most_recent[p.key], sid)
                if do:
                    prefetching.add(p.key)
                    numel += p.numel
                    gather(p)
        moments.append(Moment(step, sub.name, phase, n_available, sum(p.nbytes for p in available.values()), persistent_bytes,
                              fetched))
        # release after the submodule ran (DeepSpeed's __step_id is already step + 1 here)
        nxt = step + 1
        release = {p.key for p in sub.params if p.key not in persist and most_recent[p.key] <= nxt}
        traversed = 0
        for later, _ in trace[nxt:]:
            if traversed >= cfg.max_reuse_distance or not release:
                break
            for p in later.params:
                release.discard(p.key)
                traversed += p.numel
        for key in release:
            p = available.pop(key, None)
            if p is not None:
                n_available -= p.numel
    return moments


# --------------------------------------------------------------------------------------
# The trace of a Hugging Face causal LM's training step, from the model's shapes
# --------------------------------------------------------------------------------------


def _linear_modules(prefix: str, lin, setup, targeted: bool, elem_bytes: int, quant4: bool, adapter_bytes: int) -> list[Submodule]:
    n = lin.fan_in * lin.fan_out * lin.count
    bias = lin.fan_out * lin.count if lin.bias else 0
    frozen_quantized = quant4 and not lin.role.startswith("expert_") and setup.method != "full"
    if frozen_quantized:
        # Params4bit in bf16 quant storage: numel/4 stored elements, numel/2 bytes; the bias stays dense
        params = [Param(f"{prefix}.weight", n // 4, n // 2)]
    else:
        params = [Param(f"{prefix}.weight", n, n * elem_bytes)]
    if bias:
        params.append(Param(f"{prefix}.bias", bias, bias * elem_bytes))
    base = prefix + (".base_layer" if targeted else "")
    out = [Submodule(base, tuple(params))]
    if targeted:
        r = setup.r
        a, b = r * lin.fan_in * lin.count, lin.fan_out * r * lin.count
        out.append(Submodule(f"{prefix}.lora_A", (Param(f"{prefix}.lora_A.weight", a, a * adapter_bytes),)))
        out.append(Submodule(f"{prefix}.lora_B", (Param(f"{prefix}.lora_B.weight", b, b * adapter_bytes),)))
        if setup.use_dora or setup.method == "dora":
            m = lin.fan_out * lin.count
            out.append(Submodule(f"{prefix}.lora_magnitude_vector", (Param(f"{prefix}.magnitude", m, m * adapter_bytes),)))
    return out


def model_submodules(model, setup) -> tuple[list[Submodule], list[list[Submodule]], list[Submodule]]:
    """(head: [embedding], blocks: each block's submodules in forward order, tail: [final norm, LM head])."""
    from tools.analytic import _counts, block_linears, lora_targets

    mixed = setup.bf16 or setup.fp16
    # DeepSpeed's bf16/fp16 engine holds every module parameter in the 16-bit dtype (fp32 masters apart)
    elem = 2 if mixed else {"fp32": 4, "bf16": 2, "fp16": 2}[setup.dtype]
    quant4 = bool(setup.load_in_4bit)
    lora = setup.method in ("lora", "qlora", "dora")
    targets = {lin.path for lin in lora_targets(model, setup)} if lora else set()
    c = _counts(model, setup)
    h = model.hidden_size
    norm = max(1, c.norms // 2)
    blocks: list[list[Submodule]] = []
    lins = block_linears(model)
    attn = [lin for lin in lins if lin.role in ("q", "k", "v", "qkv", "o")]
    mlp = [lin for lin in lins if lin not in attn]
    for i in range(model.num_hidden_layers):
        p = f"layers.{i}"
        subs = [Submodule(f"{p}.input_layernorm", (Param(f"{p}.input_layernorm.weight", norm, norm * elem),))]
        for lin in attn:
            subs += _linear_modules(f"{p}.{lin.path}", lin, setup, lin.path in targets, elem, quant4, elem)
        subs.append(Submodule(f"{p}.post_attention_layernorm", (Param(f"{p}.post_attention_layernorm.weight", norm, norm * elem),)))
        for lin in mlp:
            subs += _linear_modules(f"{p}.{lin.path}", lin, setup, lin.path in targets, elem, quant4, elem)
        blocks.append(subs)
    embed = Param("embed_tokens.weight", c.embed, c.embed * elem)
    head = [Submodule("embed_tokens", (embed,))]
    tail = [Submodule("norm", (Param("norm.weight", h, h * elem),))]
    if setup.task == "sequence-classification":
        tail.append(Submodule("score", (Param("score.weight", c.head, c.head * elem),)))
    elif model.tie_word_embeddings:
        tail.append(Submodule("lm_head", (embed,)))
    else:
        tail.append(Submodule("lm_head", (Param("lm_head.weight", c.head, c.head * elem),)))
    return head, blocks, tail


def step_trace(model, setup) -> list[tuple[Submodule, str]]:
    """The (submodule, phase) order of one training step's fetches: forward, then backward in reverse,
    each block re-running its forward first under gradient checkpointing."""
    head, blocks, tail = model_submodules(model, setup)
    trace = [(s, FORWARD) for s in head]
    for b in blocks:
        trace += [(s, FORWARD) for s in b]
    trace += [(s, FORWARD) for s in tail]
    trace += [(s, BACKWARD_LOSS) for s in reversed(tail)]
    for b in reversed(blocks):
        if setup.gradient_checkpointing:
            trace += [(s, BACKWARD) for s in b]
        trace += [(s, BACKWARD) for s in reversed(b)]
    trace += [(s, BACKWARD_TAIL) for s in reversed(head)]
    return trace


def coordinator_config(setup, hidden_size: int) -> CoordinatorConfig:
    """The values the run's ds_config.json resolves: the setup's, or transformers' "auto" rules
    (stage3_prefetch_bucket_size = 0.9 h^2, stage3_param_persistence_threshold = 10 h)."""
    from tools.memory.distributed import zero_bucket_sizes

    _, prefetch = zero_bucket_sizes(setup, hidden_size)
    return CoordinatorConfig(prefetch_bucket_size=prefetch,
                             max_live_parameters=float(setup.zero_max_live_parameters),
                             max_reuse_distance=float(setup.zero_max_reuse_distance),
                             param_persistence_threshold=float(setup.zero_param_persistence_threshold or 10 * hidden_size))


def gathered_by_segment(model, setup) -> tuple[dict[str, int], dict[str, Moment]]:
    """Per segment of the step: the most bytes ZeRO-3 holds gathered (persistent included), and that moment.
    The optimizer segment holds the persistent parameters only (everything else was released in backward)."""
    moments = replay(step_trace(model, setup), coordinator_config(setup, model.hidden_size))
    best: dict[str, Moment] = {}
    for m in moments:
        if m.phase not in best or m.total_bytes > best[m.phase].total_bytes:
            best[m.phase] = m
    out = {seg: m.total_bytes for seg, m in best.items()}
    if moments:
        out["optimizer"] = moments[0].persistent_bytes
    return out, best
