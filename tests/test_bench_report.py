"""bench_report: speedups from a pytest-benchmark JSON file, as Markdown and a PNG chart."""

import builtins
import json
import subprocess
import sys

import pytest

from cmkernels import bench_report


def _bench(group, provider, median, **extra):
    # A mean inflated by one slow round: every figure must come from the median.
    info = {"provider": provider, **extra}
    stats = {"median": median, "mean": median * (3.0 if provider == "cmkernels" else 1.0),
             "min": median * 0.9}  # fmt: skip
    return {
        "group": group,
        "name": f"t[{provider}]",
        "params": {"provider": provider},
        "extra_info": info,
        "stats": stats,
    }


def _write(tmp_path, benches):
    src = tmp_path / "b.json"
    src.write_text(json.dumps({"benchmarks": benches}))
    return src


def test_table_and_chart(tmp_path):
    src = _write(tmp_path, [_bench("gn", "eager", 2.0), _bench("gn", "cmkernels", 0.5),
                            _bench("gn", "torch.compile", 1.0)])  # fmt: skip
    assert bench_report.main([str(src), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r.md").read_text()
    # one row per provider, speedups against eager and torch.compile side by side
    assert "| provider | median | min | extra | vs eager | vs torch.compile |" in md
    assert "| cmkernels | 500 ms | 450 ms |  | 4.00x | 2.00x |" in md
    assert "| torch.compile | 1 s | 900 ms |  | 2.00x | 1.00x |" in md
    # the summary row of the group
    assert "| gn | 500 ms | 2 s | 1 s | 4.00x | 2.00x | cmkernels | 4.00x | 2.00x |" in md
    assert "at least as fast as eager and torch.compile in all 1 groups" in md
    assert (tmp_path / "r.png").stat().st_size > 1000
    # written through temporary files that are renamed over the outputs: none is left behind
    assert not list(tmp_path.glob(".*.tmp"))


def test_slower_groups_are_listed_plainly(tmp_path):
    benches = [
        _bench("a", "eager", 2.0), _bench("a", "torch.compile", 0.8), _bench("a", "cmkernels", 1.0),
        _bench("a", "cmkernels+compile", 0.7),
        _bench("b", "eager", 0.9), _bench("b", "torch.compile", 2.0), _bench("b", "cmkernels", 1.0),
        _bench("c", "eager", 3.0), _bench("c", "torch.compile", 2.0), _bench("c", "cmkernels", 1.0),
        _bench("d", "eager", 3.0), _bench("d", "cmkernels", 1.0),
        _bench("d", "cmkernels+compile", 4.0),
    ]  # fmt: skip
    md = bench_report.markdown(bench_report.load(_write(tmp_path, benches)))
    assert ("**cmkernels is slower than a baseline in 2 of 4 groups:** a (vs torch.compile "
            "0.80x); b (vs eager 0.90x).") in md  # fmt: skip
    assert "Variants slower than a baseline: d: cmkernels+compile (vs eager 0.75x)." in md
    assert "| a | 1 s | 2 s | 800 ms | 2.00x | 0.80x | cmkernels+compile | 2.86x | 1.14x |" in md
    assert "Groups missing a provider: d (no torch.compile)." in md


def test_cuda_event_per_call_times_are_used(tmp_path):
    # GPU rows: pytest-benchmark's stats are per batch of N calls; the per-call figures are in
    # extra_info and must be what the report shows.
    ev = dict(timer="cuda-events", calls_per_round=100)
    benches = [
        _bench("attn", "eager", 100e-3, per_call_median_s=1e-3, per_call_min_s=0.9e-3, **ev),
        _bench("attn", "torch.compile", 80e-3, per_call_median_s=0.8e-3, per_call_min_s=7e-4, **ev),
        _bench("attn", "cmkernels", 50e-3, per_call_median_s=0.5e-3, per_call_min_s=4e-4, **ev),
    ]  # fmt: skip
    md = bench_report.markdown(bench_report.load(_write(tmp_path, benches)))
    assert "| cmkernels | 500 us | 400 us | N=100 | 2.00x | 1.60x |" in md
    assert "CUDA events around N back-to-back calls" in md


def test_markdown_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    src = _write(tmp_path, [_bench("gn", "eager", 2.0), _bench("gn", "cmkernels", 0.5),
                            _bench("gn", "torch.compile", 1.0)])  # fmt: skip
    assert bench_report.main([str(src), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "| cmkernels | 500 ms" in md and "matplotlib is not installed" in md
    assert not (tmp_path / "r.png").exists()


def test_several_files_make_one_report(tmp_path):
    ops = tmp_path / "ops.json"
    ops.write_text(json.dumps({"benchmarks": [_bench("gn", "eager", 2.0),
                                              _bench("gn", "cmkernels", 1.0)]}))  # fmt: skip
    e2e = tmp_path / "e2e.json"
    e2e.write_text(json.dumps({"benchmarks": [_bench("sample", "torch.compile", 1.0),
                                              _bench("sample", "cmkernels", 2.0)]}))  # fmt: skip
    assert bench_report.main([str(ops), str(e2e), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "## gn" in md and "## sample" in md
    assert "sample (vs torch.compile 0.50x)" in md


def test_bad_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="not a pytest-benchmark"):
        bench_report.main([str(bad)])


def test_percent_of_copy(tmp_path):
    copy = _bench("copy-bandwidth", "copy-64MB", 1.0, **{"GB/s": 200.0})
    op = _bench("ema", "cmkernels", 1.0, **{"GB/s": 150.0})
    md = bench_report.markdown(bench_report.load(_write(tmp_path, [copy, op])))
    assert "200.0 GB/s" in md and "GB/s=150.0, 75% of copy" in md


def test_runs_without_torch(tmp_path):
    # The package import is light (ops and the extension load on first use), so the report tool
    # starts without torch, triton or the compiled extension.
    src = _write(tmp_path, [_bench("gn", "eager", 2.0), _bench("gn", "cmkernels", 1.0)])
    code = ("import sys, runpy\n"
            f"sys.argv = ['bench_report', {str(src)!r}, '--out', {str(tmp_path / 'r')!r}]\n"
            "try:\n"
            "    runpy.run_module('cmkernels.bench_report', run_name='__main__')\n"
            "except SystemExit as exit:\n"
            "    assert not exit.code, exit.code\n"
            "print(sorted(m for m in ('torch', 'triton', 'cmkernels._C') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "r.md").exists()
