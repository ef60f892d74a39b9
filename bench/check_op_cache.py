"""Cross-check of the simulator's speed machinery over every model family in the catalog.

For one catalog model per model_type, LoRA and full fine-tuning (seq 128) are simulated three ways:
FakeTensorMode's full path on every op (TUNEPILOT_SIM_FASTPATH=0), the op cache being filled, and
the op cache replaying; all three must give identical bytes. Prints one line per case and a summary.

    .venv/bin/python bench/check_op_cache.py        # ~4 min on the 2-core dev machine
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    warnings.filterwarnings("ignore")
    import tools.memory.runner as sim
    import tools.memory.tracker as tracker
    from tools.models import catalog
    from tools.peft_config import loadable_setup
    from tools.schemas import TrainingSetup, TunepilotError

    sim._PARALLEL = False  # compare the paths in one process
    seen: set[str] = set()
    checked = different = 0
    for spec in catalog():
        if spec.model_type in seen:
            continue
        seen.add(spec.model_type)
        for kw in (dict(method="lora", max_length=128),
                   dict(method="full", optim="adamw_torch", max_length=128, gradient_checkpointing=False)):
            # no dropout on fused MoE experts, eager where transformers has no sdpa (Gemma-2, BLOOM)
            st, _ = loadable_setup(spec, TrainingSetup(model_id=spec.model_id, **kw))
            try:
                tracker._FAST_PATH = False
                sim.clear_cache()
                slow = sim.simulate(spec, st)
                tracker._FAST_PATH = True
                sim.clear_cache()
                tracker._OP_CACHE.clear()
                filling = sim.simulate(spec, st)
                sim.clear_cache()
                replay = sim.simulate(spec, st)
            except TunepilotError as e:
                print(f"{spec.model_id:40s} {kw['method']:5s} not simulated: {str(e)[:100]}")
                continue
            dumps = [m.model_dump(exclude={"seconds", "notes"}) for m in (slow, filling, replay)]
            same = dumps[0] == dumps[1] == dumps[2]
            checked += 1
            different += not same
            print(f"{spec.model_id:40s} {kw['method']:5s} {'identical' if same else 'DIFFERENT'}  "
                  f"peak {slow.peak_bytes / 2**30:8.3f} GiB  full path {slow.seconds:5.2f} s, replay {replay.seconds:5.2f} s")
    print(f"{checked} cases, {different} different")
    return 1 if different else 0


if __name__ == "__main__":
    raise SystemExit(main())
