"""The pictures (tools/plots.py): each is written, opens, has the expected size, and what it draws is
proportional to the numbers it shows: the SVG's bar segments (gid `seg-<key>`) are measured and their
heights compared with the estimate's breakdown, the capacity line sits at the GPU's memory, the plan's
points sit at their candidates' memory, the fit map has one cell per grid point coloured by its verdict.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("matplotlib")

from tools import plots  # noqa: E402
from tools.estimator import estimate  # noqa: E402
from tools.gpus import parse_hardware  # noqa: E402
from tools.models import lookup_model  # noqa: E402
from tools.planner import plan  # noqa: E402
from tools.schemas import FitCell, FitMap, FitRow, PlanGoals, TrainingSetup  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"
LLAMA8 = "meta-llama/Llama-3.1-8B"


# --------------------------------------------------------------------------------------
# SVG geometry helpers
# --------------------------------------------------------------------------------------


def _path_points(d: str) -> list[tuple[float, float]]:
    nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", d)]
    return list(zip(nums[0::2], nums[1::2]))


def _by_gid(root) -> dict[str, ET.Element]:
    return {g.get("id"): g for g in root.iter(f"{SVG}g") if g.get("id")}


def _rect_of(group) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the first path in a group (SVG y grows downwards)."""
    path = next(group.iter(f"{SVG}path"))
    pts = _path_points(path.get("d"))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def _svg(path):
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    return root


def _size_pt(root) -> tuple[float, float]:
    return float(root.get("width").removesuffix("pt")), float(root.get("height").removesuffix("pt"))


# --------------------------------------------------------------------------------------
# fixtures: real engine objects (analytic tier: instant)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def est():
    spec = lookup_model(LLAMA8)
    setup = TrainingSetup(model_id=LLAMA8, method="qlora", load_in_4bit=True, per_device_train_batch_size=2)
    return estimate(spec, setup, parse_hardware("4090"), fast=True)


@pytest.fixture(scope="module")
def offload_est():
    spec = lookup_model("meta-llama/Llama-3.1-70B")
    setup = TrainingSetup(model_id=spec.model_id, method="lora", num_gpus=2, zero_stage=3, offload="all")
    return estimate(spec, setup, parse_hardware("2x 4090"), fast=True)


@pytest.fixture(scope="module")
def the_plan():
    return plan(lookup_model(LLAMA8), parse_hardware("4090"), PlanGoals(dataset_tokens=10_000_000, confirm=False))


# --------------------------------------------------------------------------------------
# estimate
# --------------------------------------------------------------------------------------


def test_estimate_svg_bars_are_proportional_to_the_breakdown(est, tmp_path):
    out = plots.estimate_chart(est, tmp_path / "est.svg")
    root = _svg(out)
    w, h = _size_pt(root)
    assert (w, h) == (plots.FIGSIZE[0] * 72, plots.FIGSIZE[1] * 72)
    groups = _by_gid(root)
    segs = plots.segments(est.breakdown)
    heights = {}
    for key, _label, gib, _colour in segs:
        assert f"seg-{key}" in groups, f"no bar segment for {key}"
        x0, y0, x1, y1 = _rect_of(groups[f"seg-{key}"])
        heights[key] = y1 - y0
    # every segment's height over its GiB is the same scale (within rounding of the SVG coordinates)
    scales = {k: heights[k] / gib for k, _l, gib, _c in segs if gib >= 0.2}
    assert len(scales) >= 3
    ref = scales["weights"]
    for k, s in scales.items():
        assert s == pytest.approx(ref, rel=0.02), (k, s, ref)
    # segments are stacked: each starts where the one below ends (SVG y grows downwards)
    rects = [_rect_of(groups[f"seg-{k}"]) for k, *_ in segs]
    for below, above in zip(rects, rects[1:]):
        assert above[3] == pytest.approx(below[1], abs=0.05)
    # the capacity line sits at the GPU's memory on the same scale as the bars
    bottom = rects[0][3]
    cap_y = _path_points(next(groups["line-capacity"].iter(f"{SVG}path")).get("d"))[0][1]
    assert (bottom - cap_y) / ref == pytest.approx(est.gpu_memory_gib, rel=0.01)
    usable_y = _path_points(next(groups["line-usable"].iter(f"{SVG}path")).get("d"))[0][1]
    assert (bottom - usable_y) / ref == pytest.approx(est.gpu_memory_gib * 0.9, rel=0.01)
    # peak allocated / reserved / device total marks at their values
    for key, value in (("allocated", est.peak_allocated_gib), ("reserved", est.peak_reserved_gib), ("total", est.device_total_gib)):
        y = _path_points(next(groups[f"mark-{key}"].iter(f"{SVG}path")).get("d"))[0][1]
        assert (bottom - y) / ref == pytest.approx(value, rel=0.01), key
    # the stacked bar's top is the device total
    assert (bottom - rects[-1][1]) / ref == pytest.approx(est.device_total_gib, rel=0.01)


def test_estimate_png_opens_with_the_expected_size(est, tmp_path):
    import matplotlib.image as mpimg

    out = plots.estimate_chart(est, tmp_path / "est.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(out)
    assert img.shape[:2] == (plots.FIGSIZE[1] * plots.DPI, plots.FIGSIZE[0] * plots.DPI)
    assert img.std() > 0.05  # not a blank canvas
    assert out.stat().st_size < 150_000


def test_sharded_offload_estimate_draws_host_ram_beside_the_gpu(offload_est, tmp_path):
    assert offload_est.host_ram_gib > 10
    root = _svg(plots.estimate_chart(offload_est, tmp_path / "off.svg"))
    groups = _by_gid(root)
    host = [g for gid, g in groups.items() if gid.startswith("host-")]
    assert host, "no host RAM bar"
    gpu_bar = _rect_of(groups["seg-zero_buffers"])
    host_bar = _rect_of(host[0])
    assert host_bar[0] > gpu_bar[2]  # beside (to the right of) the GPU bar


def test_unknown_breakdown_keys_get_a_segment_or_are_grouped_by_name(est, tmp_path):
    bd = dict(est.breakdown, kv_cache_paged=1.5, some_tiny_thing=0.01, another_tiny=0.02)
    segs = plots.segments(bd)
    keys = [s[0] for s in segs]
    assert "kv_cache_paged" in keys  # large enough for its own segment, labelled by name
    other = next(s for s in segs if s[0] == "other")
    assert "some tiny thing" in other[1] and "another tiny" in other[1]
    assert other[2] == pytest.approx(0.03)
    assert sum(s[2] for s in segs) == pytest.approx(sum(v for v in bd.values() if v > 0))
    # the unknown compute component sits below the CUDA-only terms
    assert keys.index("kv_cache_paged") < keys.index("cuda_context")
    odd = est.model_copy(update={"breakdown": bd})
    groups = _by_gid(_svg(plots.estimate_chart(odd, tmp_path / "odd.svg")))
    assert "seg-kv_cache_paged" in groups and "seg-other" in groups


def test_bad_plot_paths_are_one_line_errors(est, tmp_path):
    with pytest.raises(plots.PlotError, match=r"\.png or \.svg"):
        plots.estimate_chart(est, tmp_path / "est.pdf")
    with pytest.raises(plots.PlotError, match="does not exist"):
        plots.estimate_chart(est, tmp_path / "missing" / "est.png")


def test_missing_matplotlib_is_one_clear_line(est, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(plots.PlotError, match=r"pip install 'tunepilot\[plot\]'"):
        plots.estimate_chart(est, tmp_path / "est.png")


# --------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------


def test_plan_svg_points_sit_at_their_memory_and_the_recommendation_is_marked(the_plan, tmp_path):
    assert the_plan.fits and len(the_plan.candidates) >= 3
    root = _svg(plots.plan_chart(the_plan, tmp_path / "plan.svg"))
    assert _size_pt(root) == (plots.FIGSIZE[0] * 72, plots.FIGSIZE[1] * 72)
    groups = _by_gid(root)

    def marker_xy(gid):
        use = next(groups[gid].iter(f"{SVG}use"))
        return float(use.get("x")), float(use.get("y"))

    pts = [marker_xy(f"cand-{i}") for i in range(1, len(the_plan.candidates) + 1)]
    mem = [c.estimate.device_total_gib for c in the_plan.candidates]
    hours = [c.throughput.total_hours for c in the_plan.candidates]
    # y (downwards) is linear in memory and x is linear in hours: fit on two points, check the rest
    i, j = min(range(len(mem)), key=mem.__getitem__), max(range(len(mem)), key=mem.__getitem__)
    sy = (pts[j][1] - pts[i][1]) / (mem[j] - mem[i])
    assert sy < 0  # more memory is higher up
    for k in range(len(mem)):
        assert pts[k][1] == pytest.approx(pts[i][1] + sy * (mem[k] - mem[i]), abs=0.3)
    a, b = min(range(len(hours)), key=hours.__getitem__), max(range(len(hours)), key=hours.__getitem__)
    sx = (pts[b][0] - pts[a][0]) / (hours[b] - hours[a])
    assert sx > 0
    for k in range(len(hours)):
        assert pts[k][0] == pytest.approx(pts[a][0] + sx * (hours[k] - hours[a]), abs=0.3)
    # the star sits on the recommended candidate
    best = next(n for n, c in enumerate(the_plan.candidates, 1) if c.setup == the_plan.best.setup)
    assert marker_xy("recommended") == pytest.approx(marker_xy(f"cand-{best}"))
    # fits / does not fit by colour
    fill = re.search(r"fill:\s*(#[0-9a-f]{6})", ET.tostring(groups["cand-1"], encoding="unicode"))
    assert fill and fill.group(1) == plots.FIT


def test_plan_that_does_not_fit_is_drawn_red(tmp_path):
    p = plan(lookup_model("meta-llama/Llama-3.1-70B"), parse_hardware("4090"), PlanGoals(confirm=False))
    assert not p.fits and p.candidates
    groups = _by_gid(_svg(plots.plan_chart(p, tmp_path / "nofit.svg")))
    for i in range(1, len(p.candidates) + 1):
        text = ET.tostring(groups[f"cand-{i}"], encoding="unicode")
        assert plots.NO_FIT in text
    assert "recommended" not in groups


# --------------------------------------------------------------------------------------
# fit map
# --------------------------------------------------------------------------------------


def _fit_map() -> FitMap:
    batches, seqs = [1, 2, 4], [512, 1024]
    rows = []
    for s in seqs:
        cells = [FitCell(per_device_train_batch_size=b, max_length=s, device_total_gib=4.0 * b * s / 512,
                         fits=4.0 * b * s / 512 <= 10.0, tier="simulated" if b == 2 else "analytic") for b in batches]
        fitting = [c.per_device_train_batch_size for c in cells if c.fits]
        rows.append(FitRow(max_length=s, largest_fitting_batch=max(fitting) if fitting else None, cells=cells))
    return FitMap(model_id="m", hardware="1x GPU (12 GiB)", setup_summary="LoRA", gpu_memory_gib=12.0, usable_gib=10.0,
                  safety_margin=0.1, batch_sizes=batches, seq_lens=seqs, rows=rows)


def test_fit_map_has_one_cell_per_point_coloured_by_fit(tmp_path):
    fm = _fit_map()
    root = _svg(plots.fit_map_chart(fm, tmp_path / "map.svg"))
    groups = _by_gid(root)
    for row in fm.rows:
        for c in row.cells:
            g = groups[f"cell-{c.max_length}-{c.per_device_train_batch_size}"]
            text = ET.tostring(g, encoding="unicode")
            assert (plots.FIT in text or plots.TIGHT in text) if c.fits else (plots.NO_FIT in text), c
    # cells are equal squares on a grid
    r1 = _rect_of(groups["cell-512-1"])
    r2 = _rect_of(groups["cell-512-2"])
    assert (r1[2] - r1[0]) == pytest.approx(r2[2] - r2[0], abs=0.05)
    assert r2[0] == pytest.approx(r1[2], abs=0.05)
    png = plots.fit_map_chart(fm, tmp_path / "map.png")
    import matplotlib.image as mpimg

    assert mpimg.imread(png).shape[:2] == (plots.FIGSIZE[1] * plots.DPI, plots.FIGSIZE[0] * plots.DPI)
