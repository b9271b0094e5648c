"""Turn a pytest-benchmark JSON file into a Markdown table of speedups and a PNG bar chart.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python -m cmkernels.bench_report bench.json --out benchmarks/results/cpu-2026-11-23

Benchmarks are grouped by `benchmark.group`; within a group each row is a provider (recorded in
`extra_info["provider"]`, else taken from the test's parameters). Speedups are the baselines'
median times divided by the provider's (higher is faster; the median resists the outliers of
shared machines): over "eager" (eager fp32 for the end-to-end benchmarks) and over "eager-bf16"
where a group has one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

BASELINES = ("eager", "eager-fp32", "eager-bf16")


def _provider(bench: dict) -> str:
    info = bench.get("extra_info") or {}
    if "provider" in info:
        return str(info["provider"])
    params = bench.get("params") or {}
    return str(params.get("provider", bench.get("name", "?")))


def load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: cannot read benchmark JSON {path}: {exc}") from None
    if "benchmarks" not in data:
        raise SystemExit(f"error: {path} is not a pytest-benchmark JSON file (no 'benchmarks')")
    return data


def groups(data: dict) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        out[bench.get("group") or bench["name"]][_provider(bench)] = bench
    return out


def _time(bench: dict) -> float:
    """The statistic every figure uses: the median (the mean in files written without one)."""
    stats = bench["stats"]
    return stats.get("median", stats["mean"])


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


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


def markdown(data: dict) -> str:
    peak = copy_bandwidth(data)
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    lines = [
        "# Benchmark results",
        "",
        f"- machine: {machine.get('node', '?')} ({machine.get('cpu', {}).get('brand_raw', '?')})",
        f"- commit: {commit.get('id', '?')} ({commit.get('branch', '?')}), "
        f"dirty={commit.get('dirty', '?')}",
        f"- date: {data.get('datetime', '?')}",
        f"- versions: {_versions(data)}",
        "",
        "Median time per call; speedup = baseline time / provider time (higher is faster).",
        f"Memory-copy bandwidth measured in this run: {peak:.1f} GB/s; '% of copy' = GB/s / that."
        if peak
        else "No copy benchmark in this run: no '% of copy' figures.",
        "",
    ]
    for group, rows in sorted(groups(data).items()):
        base = {b: _time(rows[b]) for b in BASELINES if b in rows}
        first = next(iter(rows.values()))
        device = (first.get("extra_info") or {}).get("device", "")
        lines += [f"## {group}", "", f"device: {device}", ""]
        header = "| provider | median | min | extra |" + "".join(f" vs {b} |" for b in base)
        lines += [header, "|" + " --- |" * (4 + len(base))]
        for name, bench in sorted(rows.items(), key=lambda kv: _time(kv[1])):
            st = bench["stats"]
            info = bench.get("extra_info") or {}
            extra = ", ".join(f"{k}={info[k]}" for k in ("GB/s", "TFLOP/s", "img/s", "peak_mem_gb",
                                                        "warmup_s") if k in info)  # fmt: skip
            if peak and info.get("GB/s"):
                extra += f", {100 * info['GB/s'] / peak:.0f}% of copy"
            speed = "".join(f" {base[b] / _time(bench):.2f}x |" for b in base)
            lines.append(f"| {name} | {_fmt_time(_time(bench))} | {_fmt_time(st['min'])} | "
                         f"{extra} |{speed}")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = groups(data)
    rows = []
    for group, provs in sorted(gs.items()):
        base = next((b for b in BASELINES if b in provs), None)
        if base is None:
            continue
        t0 = _time(provs[base])
        for name, bench in provs.items():
            rows.append((group, name, t0 / _time(bench)))
    if not rows:
        return
    providers = sorted({r[1] for r in rows})
    names = sorted({r[0] for r in rows})
    fig, ax = plt.subplots(figsize=(10, max(3, 0.35 * len(names) * max(1, len(providers)) / 2)))
    height = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        vals = {g: s for g, p, s in rows if p == prov}
        ys = [j + i * height for j in range(len(names))]
        ax.barh(ys, [vals.get(g, 0) for g in names], height=height, label=prov)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(names))])
    ax.set_yticklabels(names, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speedup over eager (higher is faster)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmkernels.bench_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("json", type=Path, help="a --benchmark-json file")
    p.add_argument("--out", type=Path, default=None,
                   help="write OUT.md and OUT.png (default: print the table)")  # fmt: skip
    args = p.parse_args(argv)
    data = load(args.json)
    text = markdown(data)
    if args.out is None:
        print(text)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    chart(data, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
