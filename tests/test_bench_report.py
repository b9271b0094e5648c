"""bench_report: speedups from a pytest-benchmark JSON file, as Markdown and a PNG chart."""

import json

import pytest

from cmkernels import bench_report


def _bench(group, provider, median):
    # A mean inflated by one slow round: every figure must come from the median.
    info = {"provider": provider}
    stats = {"median": median, "mean": median * (3.0 if provider == "cmkernels" else 1.0),
             "min": median * 0.9}  # fmt: skip
    return {
        "group": group,
        "name": f"t[{provider}]",
        "params": info,
        "extra_info": info,
        "stats": stats,
    }


def test_table_and_chart(tmp_path):
    data = {"benchmarks": [_bench("gn", "eager", 2.0), _bench("gn", "cmkernels", 0.5),
                           _bench("gn", "torch.compile", 1.0)]}  # fmt: skip
    src = tmp_path / "b.json"
    src.write_text(json.dumps(data))
    assert bench_report.main([str(src), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "| cmkernels | 500 ms" in md and "4.00x" in md and "2.00x" in md
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_bad_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="not a pytest-benchmark"):
        bench_report.main([str(bad)])


def test_percent_of_copy(tmp_path):
    copy = _bench("copy-bandwidth", "copy-64MB", 1.0)
    copy["extra_info"]["GB/s"] = 200.0
    op = _bench("ema", "cmkernels", 1.0)
    op["extra_info"]["GB/s"] = 150.0
    src = tmp_path / "b.json"
    src.write_text(json.dumps({"benchmarks": [copy, op]}))
    md = bench_report.markdown(bench_report.load(src))
    assert "200.0 GB/s" in md and "GB/s=150.0, 75% of copy" in md
