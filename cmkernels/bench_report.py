"""Turn a pytest-benchmark JSON file into a Markdown report of speedups and a PNG bar chart.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python -m cmkernels.bench_report bench.json --out benchmarks/results/cpu-2026-11-23
    python -m cmkernels.bench_report ops.json e2e.json --out report   # several runs, one report

Benchmarks are grouped by `benchmark.group`; within a group each row is a provider (recorded in
`extra_info["provider"]`, else taken from the test's parameters). Every figure is the time of one
call: the median of the CUDA-event per-call times where the benchmark recorded them
(`extra_info["per_call_median_s"]`, N back-to-back calls per measurement), else pytest-benchmark's
median (the median resists the outliers of shared machines). Speedup = baseline time / provider
time (higher is faster), against both baselines of every group: "eager" (what a user writes in
plain PyTorch) and "torch.compile" (that code compiled), and "torch.compile+cudagraph" where a
group has it. The summary lists every group where a cmkernels provider is slower than a baseline.
matplotlib is optional (the `report` extra): without it the Markdown is still written, with a note
instead of the chart. The module imports neither torch nor the compiled extension.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

BASELINES = ("eager", "torch.compile", "torch.compile+cudagraph")
NAN = float("nan")  # a bar left out of the chart
OURS = "cmkernels"  # the plain provider; variants are "cmkernels+compile", "cmkernels+cudagraph"
REQUIRED = ("eager", "torch.compile", OURS)  # every group with a cmkernels row should have these


def _provider(bench: dict) -> str:
    info = bench.get("extra_info") or {}
    if "provider" in info:
        return str(info["provider"])
    params = bench.get("params") or {}
    return str(params.get("provider", bench.get("name", "?")))


def load(*paths: Path) -> dict:
    """One or more pytest-benchmark JSON files as one: the benchmarks of all, the machine and
    commit information of the first."""
    merged = None
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"error: cannot read benchmark JSON {path}: {exc}") from None
        if "benchmarks" not in data:
            raise SystemExit(f"error: {path} is not a pytest-benchmark JSON file (no 'benchmarks')")
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] = merged["benchmarks"] + data["benchmarks"]
    return merged


def groups(data: dict) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        out[bench.get("group") or bench["name"]][_provider(bench)] = bench
    return out


def _time(bench: dict) -> float:
    """Seconds per call: the CUDA-event per-call median if recorded, else the median (the mean
    in files written without one)."""
    info = bench.get("extra_info") or {}
    if info.get("per_call_median_s"):
        return float(info["per_call_median_s"])
    stats = bench["stats"]
    return stats.get("median", stats["mean"])


def _min_time(bench: dict) -> float:
    info = bench.get("extra_info") or {}
    return float(info.get("per_call_min_s") or bench["stats"]["min"])


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _is_ours(provider: str) -> bool:
    return provider == OURS or provider.startswith(OURS + "+")


def copy_bandwidth(data: dict) -> float | None:
    """The best GB/s of the run's copy benchmark (benchmarks/test_bench_copy.py), if it ran."""
    rates = [
        (b.get("extra_info") or {}).get("GB/s")
        for b in data["benchmarks"]
        if b.get("group") == "copy-bandwidth"
    ]
    rates = [r for r in rates if r]
    return max(rates) if rates else None


def _versions(data: dict) -> str:
    """python, torch, triton and the devices, as the benchmarks recorded them."""
    found = {"python": data.get("machine_info", {}).get("python_version", "?")}
    devices = set()
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        found.update({k: info[k] for k in ("torch", "triton") if k in info})
        if info.get("device"):
            devices.add(info["device"])
    listed = ", ".join(f"{k} {v}" for k, v in found.items())
    return f"{listed}; devices: {'; '.join(sorted(devices))}"


def slower(data: dict) -> list[tuple[str, str, str, float]]:
    """(group, cmkernels provider, baseline, speedup < 1) for every cmkernels row slower than a
    baseline of its group."""
    found = []
    for group, rows in sorted(groups(data).items()):
        for name in sorted(p for p in rows if _is_ours(p)):
            for base in BASELINES:
                if base in rows:
                    speedup = _time(rows[base]) / _time(rows[name])
                    if speedup < 1.0:
                        found.append((group, name, base, speedup))
    return found


def missing(data: dict) -> dict[str, list[str]]:
    """Groups with a cmkernels row that lack one of REQUIRED, and what they lack."""
    out = {}
    for group, rows in sorted(groups(data).items()):
        if any(_is_ours(p) for p in rows):
            lack = [p for p in REQUIRED if p not in rows]
            if lack:
                out[group] = lack
    return out


def _summary(data: dict) -> list[str]:
    """One row per group with a cmkernels provider: cmkernels and its best variant against both
    baselines, then the plain list of every slower case."""
    lines = [
        "## Summary: cmkernels against both baselines",
        "",
        "| group | cmkernels | eager | torch.compile | vs eager | vs torch.compile | best "
        "cmkernels variant | best vs eager | best vs torch.compile |",
        "|" + " --- |" * 9,
    ]
    n_groups = 0
    for group, rows in sorted(groups(data).items()):
        ours = {p: _time(b) for p, b in rows.items() if _is_ours(p)}
        if not ours:
            continue
        n_groups += 1
        best = min(ours, key=ours.get)
        eager, comp = (_time(rows[b]) if b in rows else None for b in ("eager", "torch.compile"))

        def cell(t):
            return _fmt_time(t) if t is not None else "-"

        def ratio(base, t):
            return f"{base / t:.2f}x" if base is not None and t is not None else "-"

        plain = ours.get(OURS)
        lines.append(
            f"| {group} | {cell(plain)} | {cell(eager)} | {cell(comp)} | {ratio(eager, plain)} | "
            f"{ratio(comp, plain)} | {best} | {ratio(eager, ours[best])} | "
            f"{ratio(comp, ours[best])} |"
        )
    found = slower(data)
    plain = [f for f in found if f[1] == OURS]
    lines.append("")
    if plain:
        listed = "; ".join(f"{g} (vs {b} {s:.2f}x)" for g, _, b, s in plain)
        slow_groups = len({f[0] for f in plain})
        lines.append(f"**cmkernels is slower than a baseline in {slow_groups} of {n_groups} "
                     f"groups:** {listed}.")  # fmt: skip
    else:
        lines.append(f"cmkernels is at least as fast as eager and torch.compile in all {n_groups} "
                     "groups.")  # fmt: skip
    variants = [f for f in found if f[1] != OURS]
    if variants:
        listed = "; ".join(f"{g}: {p} (vs {b} {s:.2f}x)" for g, p, b, s in variants)
        lines.append("")
        lines.append(f"Variants slower than a baseline: {listed}.")
    gaps = missing(data)
    if gaps:
        listed = "; ".join(f"{g} (no {', '.join(lack)})" for g, lack in gaps.items())
        lines += ["", f"Groups missing a provider: {listed}."]
    return lines + [""]


def markdown(data: dict, notes: list[str] | None = None) -> str:
    peak = copy_bandwidth(data)
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    timers = {(b.get("extra_info") or {}).get("timer") for b in data["benchmarks"]}
    lines = [
        "# Benchmark results",
        "",
        f"- machine: {machine.get('node', '?')} ({machine.get('cpu', {}).get('brand_raw', '?')})",
        f"- commit: {commit.get('id', '?')} ({commit.get('branch', '?')}), "
        f"dirty={commit.get('dirty', '?')}",
        f"- date: {data.get('datetime', '?')}",
        f"- versions: {_versions(data)}",
        "",
        "Time per call (median); speedup = baseline time / provider time (higher is faster), "
        "against eager (plain PyTorch as a user writes it) and torch.compile (that code compiled "
        "per case, recompilation an error).",
    ]
    if "cuda-events" in timers:
        lines.append("GPU rows: CUDA events around N back-to-back calls per measurement "
                     "(N in 'extra'), divided by N.")  # fmt: skip
    lines.append(
        f"Memory-copy bandwidth measured in this run: {peak:.1f} GB/s; '% of copy' = GB/s / that."
        if peak
        else "No copy benchmark in this run: no '% of copy' figures."
    )
    lines += [f"Note: {n}" for n in notes or []]
    lines.append("")
    lines += _summary(data)
    for group, rows in sorted(groups(data).items()):
        base = {b: _time(rows[b]) for b in BASELINES if b in rows}
        first = next(iter(rows.values()))
        device = (first.get("extra_info") or {}).get("device", "")
        lines += [f"## {group}", "", f"device: {device}", ""]
        header = "| provider | median | min | extra |" + "".join(f" vs {b} |" for b in base)
        lines += [header, "|" + " --- |" * (4 + len(base))]
        for name, bench in sorted(rows.items(), key=lambda kv: _time(kv[1])):
            info = bench.get("extra_info") or {}
            extra = [f"{k}={info[k]}" for k in ("GB/s", "TFLOP/s", "img/s", "peak_mem_gb",
                                                "warmup_s") if k in info]  # fmt: skip
            if peak and info.get("GB/s"):
                extra.append(f"{100 * info['GB/s'] / peak:.0f}% of copy")
            if info.get("calls_per_round", 1) > 1:
                extra.append(f"N={info['calls_per_round']}")
            extra = ", ".join(extra)
            speed = "".join(f" {base[b] / _time(bench):.2f}x |" for b in base)
            lines.append(f"| {name} | {_fmt_time(_time(bench))} | {_fmt_time(_min_time(bench))} | "
                         f"{extra} |{speed}")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def chart(data: dict, path: Path) -> None:
    """Speedup of every provider over eager (left) and over torch.compile (right), per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = {g: rows for g, rows in sorted(groups(data).items()) if "eager" in rows}
    if not gs:
        return
    providers = sorted({p for rows in gs.values() for p in rows})
    names = list(gs)
    height = 0.8 / len(providers)
    size = (14, max(3.0, 0.15 * len(names) * len(providers)))
    fig, axes = plt.subplots(1, 2, sharey=True, figsize=size)
    for ax, base in zip(axes, ("eager", "torch.compile")):
        for i, prov in enumerate(providers):
            vals = [
                _time(gs[g][base]) / _time(gs[g][prov]) if {base, prov} <= gs[g].keys() else NAN
                for g in names
            ]
            ax.barh([j + i * height for j in range(len(names))], vals, height=height, label=prov)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")  # ratios: 2x faster and 2x slower the same length
        ax.set_xlabel(f"speedup over {base} (log scale, higher is faster)")
    axes[0].set_yticks([j + 0.4 - height / 2 for j in range(len(names))])
    axes[0].set_yticklabels(names, fontsize=7)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over path (a crash
    leaves the old report or the new one, never half of one). Kept here rather than importing
    cmkernels.checkpoint: this module loads without torch."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmkernels.bench_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("json", type=Path, nargs="+", help="--benchmark-json file(s)")
    p.add_argument("--out", type=Path, default=None,
                   help="write OUT.md and OUT.png (default: print the table)")  # fmt: skip
    args = p.parse_args(argv)
    data = load(*args.json)
    if args.out is None:
        print(markdown(data))
        return 0
    md, png = args.out.with_suffix(".md"), args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    notes = []
    if not _have_matplotlib():
        notes.append(f"no chart ({png.name} not written): matplotlib is not installed "
                     "(pip install matplotlib, or cmkernels[report]).")
    _write_text_atomic(md, markdown(data, notes))
    if notes:
        print(f"wrote {md} ({notes[0]})")
        return 0
    chart(data, png)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
