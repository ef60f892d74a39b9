"""Pictures of tunepilot's answers: what fills the GPU, which plan candidates fit, where the fit map's edge is.

Three pure functions over the engine's objects, each writing one file (SVG or PNG by its suffix):

- `estimate_chart(est, path)`: one stacked bar of the per-GPU breakdown of a MemoryEstimate, in the
  order memory is taken (weights ... activations, then the CUDA-only terms), the GPU's capacity and
  the usable line (capacity minus the planner's safety margin) across it, peak allocated / reserved /
  device total marked beside the bar, and for sharded or offloaded setups the host RAM in a second
  panel beside it;
- `plan_chart(plan, path)`: the candidates as memory per GPU against time to train, fits / does not
  fit by colour, the recommendation marked, numbered as in `tunepilot plan`'s table;
- `fit_map_chart(fit_map, path)`: the sweep's micro-batch x sequence-length grid, each cell coloured
  by fit and labelled with its GiB (* = simulated), the largest fitting cell of each row outlined.

Breakdown keys are not fixed: keys this module does not know get their own bar segment named after
the key when they are large, and are grouped into one 'other (a, b)' segment when small, so new
components in the estimator show up without a change here.

Every drawn element that a test or a reader may want to find carries a gid (SVG `id`):
`seg-<key>` for bar segments, `host-<key>` for host segments, `line-capacity`, `line-usable`,
`mark-allocated`/`mark-reserved`/`mark-total`, `cand-<n>`, `cell-<seq>-<batch>`.

`setup_chart(setup, path, memory=...)` re-estimates a conversation's current setup and draws its
estimate chart (`/plot` in chat, the Slack bot's chart upload).

matplotlib (the `plot` extra) is imported on first use; figures are drawn without pyplot (no global
state, safe in the Slack bot's worker threads) by the Agg renderer for PNG and the SVG one for SVG.
Without matplotlib every function raises PlotError with one line saying how to install it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Optional

from tools.schemas import MemoryEstimate, Plan, TunepilotError

SUFFIXES = (".png", ".svg")
SAFETY_MARGIN = 0.10  # the planner's default (PlanGoals.safety_margin): the 'usable' line
FIGSIZE = (8.0, 5.0)  # inches; PNG at DPI -> 800 x 500 pixels, SVG 576 x 360 pt
DPI = 100
SMALL_FRACTION = 0.02  # unknown components below 2% of the total are grouped into 'other'

# Known components in the order memory is taken; labels and colours for the legend.
COMPONENTS: dict[str, tuple[str, str]] = {
    "weights": ("base weights", "#4c72b0"),
    "adapters": ("adapters", "#8172b3"),
    "gradients": ("gradients", "#dd8452"),
    "optimizer_state": ("optimizer states", "#c44e52"),
    "zero_buffers": ("ZeRO/FSDP buffers", "#937860"),
    "fsdp_all_gather": ("FSDP all-gather", "#a58d6f"),
    "zero_gathered_params": ("ZeRO-3 gathered", "#b89f7f"),
    "activations": ("activations", "#55a868"),
    "kv_cache": ("KV cache", "#64b5cd"),
    "logits_loss": ("logits and loss", "#8fd175"),
    "temporaries": ("step temporaries", "#ccb974"),
    "cublas_workspace": ("cuBLAS workspaces", "#b0b0b0"),
    "allocator_overhead": ("allocator overhead", "#9a9a9a"),
    "cuda_context": ("CUDA context", "#707070"),
    "nccl_buffers": ("NCCL buffers", "#505050"),
}
_EXTRA_COLOURS = ("#da8bc3", "#8c8c8c", "#e8a0a0", "#a0c8e8", "#c8e8a0", "#e8d0a0")
_OTHER_COLOUR = "#d9d9d9"
_HOST_COLOURS = ("#9467bd", "#17becf", "#bcbd22", "#8c564b", "#e377c2", "#7f7f7f", "#1f77b4", "#ff7f0e", "#aec7e8", "#98df8a")
FIT, NO_FIT, TIGHT = "#2ca02c", "#d62728", "#ff9f1c"


class PlotError(TunepilotError):
    """A picture cannot be made as asked (matplotlib missing, unknown file type, unwritable path)."""


def _figure():
    """matplotlib's Figure class (no pyplot: no global state, safe in the Slack bot's worker threads),
    or PlotError naming the fix when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'tunepilot[plot]' (or pip install matplotlib)") from None
    from matplotlib.figure import Figure

    matplotlib.rcParams["svg.hashsalt"] = "tunepilot"  # stable SVG ids between runs
    return Figure


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise PlotError(f"--plot {path}: give a file ending in .png or .svg")
    if path.parent and not path.parent.exists():
        raise PlotError(f"--plot {path}: the folder {path.parent} does not exist")
    return path


def _save(fig, path: Path) -> Path:
    meta = {"Creator": "tunepilot"} if path.suffix.lower() == ".png" else {"Creator": "tunepilot", "Date": None}
    try:
        fig.savefig(path, dpi=DPI, metadata=meta)  # the Agg / SVG backend by the suffix
    except OSError as e:
        raise PlotError(f"--plot {path}: cannot write the picture ({e.strerror or e})") from None
    return path


# --------------------------------------------------------------------------------------
# The breakdown as bar segments
# --------------------------------------------------------------------------------------


def segments(breakdown: dict[str, float], *, small: float = SMALL_FRACTION) -> list[tuple[str, str, float, str]]:
    """The breakdown as ordered bar segments (key, label, GiB, colour).

    Known keys keep their order and colours; unknown keys at least `small` of the total get their own
    segment labelled by name; smaller unknown ones are summed into one 'other (a, b)' segment
    (key 'other'). Zero and negative values are left out.
    """
    items = {k: float(v) for k, v in breakdown.items() if isinstance(v, (int, float)) and v > 0}
    total = sum(items.values()) or 1.0
    out: list[tuple[str, str, float, str]] = []
    for key, (label, colour) in COMPONENTS.items():
        if key in items:
            out.append((key, label, items.pop(key), colour))
    grouped: list[tuple[str, float]] = []
    extra = iter(_EXTRA_COLOURS)
    for key, v in sorted(items.items(), key=lambda kv: -kv[1]):
        if v >= small * total:
            # before the CUDA-only terms: an unknown component is most likely a compute one
            pos = next((i for i, s in enumerate(out) if s[0] in ("cublas_workspace", "allocator_overhead", "cuda_context", "nccl_buffers")), len(out))
            out.insert(pos, (key, key.replace("_", " "), v, next(extra, _OTHER_COLOUR)))
        else:
            grouped.append((key, v))
    if grouped:
        names = ", ".join(k.replace("_", " ") for k, _ in grouped)
        out.append(("other", f"other ({names})", sum(v for _, v in grouped), _OTHER_COLOUR))
    return out


_SHARDED = ("zero1", "zero2", "zero3", "fsdp", "offload")


def sharded(est: Any) -> bool:
    """True for ZeRO / FSDP / CPU-offload setups (their host RAM is drawn beside the GPU)."""
    return any(s in est.setup_summary for s in _SHARDED)


def _host_breakdown(est: Any) -> dict[str, float]:
    """Host RAM by component when the estimate has one (host_breakdown), else one 'host RAM' segment."""
    hb = getattr(est, "host_breakdown", None)
    if isinstance(hb, dict) and any(isinstance(v, (int, float)) and v > 0 for v in hb.values()):
        return {k: float(v) for k, v in hb.items() if isinstance(v, (int, float))}
    host = float(getattr(est, "host_ram_gib", 0.0) or 0.0)
    return {"host_ram": host} if host > 0 else {}


def _usable(capacity: Optional[float], margin: float) -> Optional[float]:
    return None if capacity is None else capacity * (1.0 - margin)


# --------------------------------------------------------------------------------------
# estimate
# --------------------------------------------------------------------------------------


def estimate_chart(est: MemoryEstimate, path: str | Path, *, safety_margin: float = SAFETY_MARGIN,
                   title: Optional[str] = None, host: Optional[bool] = None) -> Path:
    """Write the stacked per-GPU breakdown of `est` to `path` (.png / .svg); host RAM beside it for
    sharded / offloaded setups (host=None), always (True) or never (False)."""
    path = _check_path(path)
    Figure = _figure()
    host = _host_breakdown(est) if (sharded(est) if host is None else host) else {}
    segs = segments(est.breakdown)
    capacity = est.gpu_memory_gib
    usable = _usable(capacity, safety_margin)

    # panels: the bar, the legend, and (sharded / offloaded setups) the host RAM
    if host:
        fig = Figure(figsize=FIGSIZE)
        ax, lax, hax = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2.3, 1.25, 0.8]})
    else:
        fig = Figure(figsize=FIGSIZE)
        ax, lax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.3, 1.25]})
        hax = None
    lax.axis("off")
    bottom = 0.0
    width = 0.6
    handles = []
    for key, label, v, colour in segs:
        bar = ax.bar([0], [v], width, bottom=[bottom], color=colour, edgecolor="white", linewidth=0.6,
                     label=f"{label}  {v:.2f} GiB")
        bar.patches[0].set_gid(f"seg-{key}")
        handles.append(bar)
        if v >= 0.045 * max(est.device_total_gib, capacity or 0.0):
            name = label if len(label) <= 18 else textwrap.shorten(label, 18, placeholder="…")
            ax.text(0, bottom + v / 2, f"{name}\n{v:.1f} GiB", ha="center", va="center", fontsize=8,
                    color="white" if key not in ("logits_loss", "temporaries", "other") else "black")
        bottom += v
    top = max(bottom, est.device_total_gib, capacity or 0.0, est.uncertainty.high_gib)
    ax.set_ylim(0, top * 1.08)
    ax.set_xlim(-0.4, 1.05)
    ax.set_xticks([0])
    ax.set_xticklabels(["per GPU"])
    ax.set_ylabel("GiB")
    # capacity and usable lines across the whole panel
    lines = []
    if capacity is not None:  # named in the legend, so their labels never collide with the marks
        line = ax.axhline(capacity, color="#d62728", linewidth=1.6, label=f"{est.gpu or 'GPU'}: {capacity:g} GiB")
        line.set_gid("line-capacity")
        lines.append(line)
        line = ax.axhline(usable, color="#d62728", linewidth=1.0, linestyle="--",
                          label=f"usable ({100 * (1 - safety_margin):.0f}%): {usable:.1f} GiB")
        line.set_gid("line-usable")
        lines.append(line)
    # peak allocated / reserved / device total, marked beside the bar
    x0 = width / 2 + 0.02
    for key, value, text in (("allocated", est.peak_allocated_gib, "peak allocated"),
                             ("reserved", est.peak_reserved_gib, "peak reserved"),
                             ("total", est.device_total_gib, "device total (nvidia-smi)")):
        (mark,) = ax.plot([x0, x0 + 0.08], [value, value], color="black", linewidth=1.2)
        mark.set_gid(f"mark-{key}")
    # labels spread so they never overlap
    ys = _spread([est.peak_allocated_gib, est.peak_reserved_gib, est.device_total_gib], gap=top * 0.045)
    for y_text, value, text in zip(ys, (est.peak_allocated_gib, est.peak_reserved_gib, est.device_total_gib),
                                   ("peak allocated", "peak reserved", "device total")):
        ax.annotate(f"{text} {value:.2f} GiB", xy=(x0 + 0.08, value), xytext=(x0 + 0.12, y_text), fontsize=8,
                    va="center", arrowprops={"arrowstyle": "-", "color": "#555555", "linewidth": 0.6})
    band = est.uncertainty
    ax.errorbar([x0 + 0.04], [est.device_total_gib], yerr=[[max(0.0, est.device_total_gib - band.low_gib)],
                [max(0.0, band.high_gib - est.device_total_gib)]], fmt="none", ecolor="#555555", capsize=3, linewidth=0.8)
    verdict = ""
    if est.fits is not None:
        verdict = ": fits" if est.fits else ": does not fit"
    fig.suptitle(title or f"{est.model_id}{verdict}\n" + "\n".join(textwrap.wrap(est.setup_summary, 100)), fontsize=9)
    gpu_legend = lax.legend(handles=lines + handles[::-1], fontsize=7, loc="upper left", frameon=False, borderaxespad=0.0,
                            title=f"per GPU, {est.tier} tier, ±{est.uncertainty.pct:g}%", title_fontsize=7, alignment="left")
    ax.spines[["top", "right"]].set_visible(False)

    if hax is not None:
        hbottom = 0.0
        host_handles = []
        for i, (key, v) in enumerate(sorted(host.items(), key=lambda kv: -kv[1])):
            if v <= 0:
                continue
            colour = _HOST_COLOURS[i % len(_HOST_COLOURS)]
            name = COMPONENTS.get(key, ("host RAM" if key == "host_ram" else key.replace("_", " "), None))[0]
            bar = hax.bar([0], [v], 0.5, bottom=[hbottom], color=colour, edgecolor="white", linewidth=0.6,
                          label=f"{name}  {v:.2f} GiB")
            bar.patches[0].set_gid(f"host-{key}")
            host_handles.append(bar)
            if v >= 0.06 * sum(host.values()):
                hax.text(0, hbottom + v / 2, f"{name}\n{v:.1f} GiB", ha="center", va="center", fontsize=7, color="white")
            hbottom += v
        hax.set_ylim(0, max(hbottom, 1e-3) * 1.08)
        hax.set_xticks([0])
        hax.set_xticklabels(["host RAM"])
        hax.set_title(f"host RAM per node\n{hbottom:.1f} GiB", fontsize=8)
        if len(host_handles) > 1:  # the host's parts, below the GPU's legend
            lax.add_artist(gpu_legend)
            lax.legend(handles=host_handles[::-1], fontsize=7, loc="lower left", frameon=False, borderaxespad=0.0,
                       title="host RAM per node", title_fontsize=7, alignment="left")
        hax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def _spread(values: list[float], gap: float) -> list[float]:
    """Label positions for `values` (in order) with at least `gap` between neighbours."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = list(values)
    for a, b in zip(order, order[1:]):
        if out[b] - out[a] < gap:
            out[b] = out[a] + gap
    return out


# --------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------


def candidate_time(c) -> tuple[Optional[float], str]:
    """(x value, axis label): hours to train when every candidate has them, else minutes per million tokens."""
    thr = c.throughput
    if thr.total_hours is not None:
        return thr.total_hours, "hours to train"
    if thr.tokens_per_second:
        return 1e6 / thr.tokens_per_second / 60.0, "minutes per million training tokens"
    return None, ""


def plan_chart(plan: Plan, path: str | Path, *, safety_margin: float = SAFETY_MARGIN,
               labels: Optional[list[str]] = None) -> Path:
    """Write the plan's candidates as memory per GPU against time to train to `path` (.png / .svg).

    `labels` (one per candidate, e.g. the CLI's short setup labels) annotate the points; by default
    they are numbered as in the plan table."""
    path = _check_path(path)
    Figure = _figure()
    if not plan.candidates:
        raise PlotError("plan: no candidate to draw (the search found no setup at all)")
    hours_all = all(c.throughput.total_hours is not None for c in plan.candidates)
    xs, ys = [], []
    for c in plan.candidates:
        thr = c.throughput
        if hours_all:
            xs.append(thr.total_hours)
        else:
            xs.append(1e6 / thr.tokens_per_second / 60.0 if thr.tokens_per_second else 0.0)
        ys.append(c.estimate.device_total_gib)
    xlabel = "hours to train (all epochs)" if hours_all else "minutes per million training tokens"
    capacity = next((c.estimate.gpu_memory_gib for c in plan.candidates if c.estimate.gpu_memory_gib), None)
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    best_setup = plan.best.setup if plan.best is not None else None
    lo = min(ys + ([capacity] if capacity else []))
    hi = max(ys + ([capacity] if capacity else []))
    pad = max(0.5, 0.12 * (hi - lo))
    xlo, xhi = min(xs), max(xs)
    # label heights: neighbours (close in x) at least 4% of the y range apart
    gap, near = 0.045 * (hi - lo + 2 * pad), 0.3 * max(xhi - xlo, 1e-9)
    label_y = list(ys)
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    for n, i in enumerate(order):
        for j in order[:n]:
            if abs(xs[i] - xs[j]) < near and label_y[i] - label_y[j] < gap:
                label_y[i] = label_y[j] + gap
    for i, (c, x, y) in enumerate(zip(plan.candidates, xs, ys), 1):
        colour = FIT if c.fits else NO_FIT
        marker = "o" if c.estimate.tier == "simulated" else "s"
        (pt,) = ax.plot([x], [y], marker=marker, markersize=9, color=colour, linestyle="none",
                        markeredgecolor="black" if c.estimate.tier == "simulated" else colour, zorder=3)
        pt.set_gid(f"cand-{i}")
        text = labels[i - 1] if labels and i - 1 < len(labels) else f"#{i}"
        ax.annotate(text, (x, y), xytext=(x + 0.02 * max(xhi - xlo, 0.05 * xhi, 1e-3), label_y[i - 1]), textcoords="data",
                    fontsize=8, va="bottom", xycoords="data", annotation_clip=False)
        if best_setup is not None and c.setup == best_setup:
            (star,) = ax.plot([x], [y], marker="*", markersize=24, color="#ffd700", markeredgecolor="black",
                              linestyle="none", zorder=2)
            star.set_gid("recommended")
            ax.annotate("recommended", (x, y), xytext=(0, -16), textcoords="offset points", fontsize=8, weight="bold", ha="center")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", color=FIT, linestyle="none", label="fits"),
               Line2D([], [], marker="o", color=NO_FIT, linestyle="none", label="does not fit")]
    if best_setup is not None:
        handles.append(Line2D([], [], marker="*", markersize=12, color="#ffd700", markeredgecolor="black",
                              linestyle="none", label="recommended"))
    if capacity is not None:
        line = ax.axhline(capacity, color=NO_FIT, linewidth=1.4)
        line.set_gid("line-capacity")
        usable = _usable(capacity, safety_margin)
        line = ax.axhline(usable, color=NO_FIT, linewidth=1.0, linestyle="--")
        line.set_gid("line-usable")
        yspan = max(hi, max(label_y)) + pad - max(0.0, lo - pad)
        if (capacity - usable) / yspan < 0.05:  # too close for two labels
            ax.text(1.0, capacity, f" GPU {capacity:g} GiB\n usable {usable:.1f}", transform=ax.get_yaxis_transform(),
                    fontsize=8, color=NO_FIT, va="center")
        else:
            ax.text(1.0, capacity, f" GPU {capacity:g} GiB", transform=ax.get_yaxis_transform(), fontsize=8, color=NO_FIT, va="center")
            ax.text(1.0, usable, f" usable {usable:.1f}", transform=ax.get_yaxis_transform(), fontsize=8, color=NO_FIT, va="center")
    ax.set_ylim(max(0.0, lo - pad), max(hi, max(label_y)) + pad)
    xpad = max(0.05 * (xhi - xlo), 0.05 * xhi, 1e-3)
    ax.set_xlim(max(0.0, xlo - xpad), xhi + 6 * xpad)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("memory per GPU, GiB (device total)")
    ax.set_title(f"Plan: {plan.model_id} on {plan.hardware}\n(circles: confirmed by the simulator; squares: analytic)", fontsize=9)
    ax.legend(handles=handles, fontsize=8, loc="lower right", frameon=False)
    ax.grid(alpha=0.25)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# sweep (fit map)
# --------------------------------------------------------------------------------------


def fit_map_chart(fit_map, path: str | Path) -> Path:
    """Write the sweep's micro-batch x sequence-length fit map to `path` (.png / .svg)."""
    path = _check_path(path)
    Figure = _figure()
    from matplotlib.patches import Rectangle

    batches = list(fit_map.batch_sizes)
    fig = Figure(figsize=FIGSIZE)
    ax = fig.subplots()
    for r, row in enumerate(fit_map.rows):
        for c, cell in enumerate(row.cells):
            colour = FIT if cell.fits else NO_FIT
            if cell.fits and fit_map.usable_gib and cell.device_total_gib > 0.97 * fit_map.usable_gib:
                colour = TIGHT
            best = row.largest_fitting_batch == cell.per_device_train_batch_size
            rect = Rectangle((c, r), 1, 1, facecolor=colour, alpha=0.85 if cell.fits else 0.55,
                             edgecolor="black" if best else "white", linewidth=2.5 if best else 1.0, zorder=3 if best else 2)
            rect.set_gid(f"cell-{cell.max_length}-{cell.per_device_train_batch_size}")
            ax.add_patch(rect)
            star = "*" if cell.tier == "simulated" else ""
            ax.text(c + 0.5, r + 0.5, f"{cell.device_total_gib:.1f}{star}", ha="center", va="center", fontsize=8,
                    weight="bold" if best else "normal", color="black")
    ax.set_xlim(0, len(batches))
    ax.set_ylim(0, len(fit_map.rows))
    ax.set_xticks([i + 0.5 for i in range(len(batches))])
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_yticks([i + 0.5 for i in range(len(fit_map.rows))])
    ax.set_yticklabels([f"{row.max_length:,}" for row in fit_map.rows])
    ax.set_xlabel("micro-batch per GPU (per_device_train_batch_size)")
    ax.set_ylabel("sequence length (max_length)")
    usable = f", usable {fit_map.usable_gib:.1f} GiB" if fit_map.usable_gib else ""
    ax.set_title(f"Fit map: {fit_map.model_id} on {fit_map.hardware}{usable}\n{fit_map.setup_summary}\n"
                 "GiB per GPU (device total); * = simulated at the boundary; outlined = largest fitting micro-batch",
                 fontsize=8)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=FIT, label="fits"), Patch(color=TIGHT, label="fits, < 3% spare"),
                       Patch(color=NO_FIT, alpha=0.55, label="does not fit")],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# a conversation's current setup
# --------------------------------------------------------------------------------------


def setup_chart(setup, path: str | Path, *, memory: Optional[dict] = None) -> Path:
    """Estimate `setup` again and draw its chart to `path`: the same tier as the conversation's estimate
    (`memory['tier']`; the simulator's in-process cache makes a repeat cheap), on the setup's GPU."""
    from tools.estimator import estimate
    from tools.models import lookup_model

    path = _check_path(path)
    _figure()  # matplotlib missing: say so before estimating
    hardware = None
    if setup.gpu:
        from tools.gpus import parse_hardware

        hardware = parse_hardware(setup.gpu)
        if hardware.num_gpus != setup.num_gpus:
            hardware = hardware.model_copy(update={"num_gpus": setup.num_gpus})
    fast = (memory or {}).get("tier") != "simulated"
    est = estimate(lookup_model(setup.model_id), setup, hardware, fast=fast, advice=False)
    return estimate_chart(est, path)
