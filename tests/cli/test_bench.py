"""`puregen-fast bench` end to end on CPU: both backends, the ratio, JSON and markdown, exit 2 on
bad flags; the NVML sampler survives a card that does not report power."""

import json
import sys
import types

import pytest

from puregen_fast.cli.bench import ROW_MEANING, _NvmlSampler
from puregen_fast.cli.main import main


def test_ebm_bench_prints_both_backends_and_the_ratio(tmp_path, capsys):
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    args = ["bench", "--device", "cpu", "--method", "ebm", "--model", "small", "--batch-size",
            "4", "--steps", "3", "--repeats", "2", "--json", str(js), "--md", str(md)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    res = json.loads(js.read_text())
    assert f"**EBM-3**, model small, batch 4, fp32, {res['device']}" in out
    assert "| authors |" in out and "| fast |" in out and "| engine |" in out and "1.00x" in out
    rows = {r["backend"]: r for r in res["rows"]}
    assert set(rows) == {"authors", "fast", "engine"}  # engine: the Purifier, uint8 in and out
    # on a CPU the peak is cores x clock x FLOP/cycle, printed with the table
    peak = res["peaks"]["fp32"]
    assert f"Peak fp32: {peak['how']}" in out and "FLOP/cycle" in peak["how"]
    for name in rows:  # each row says what it times, under the table
        assert f"- `{name}`: {ROW_MEANING[name]}" in out
    assert "% of peak counts the FLOPs a row executes" in out
    for r in rows.values():
        assert len(r["times_s"]) == 2 and r["images_per_s"] == pytest.approx(4 / r["median_s"])
        assert r["tflops"] > 0 and r["peak_mem_gib"] is None
        share = r["executed_share"]  # the fast EBM's folded convolutions execute fewer FLOPs
        assert (share == 1.0) == (r["backend"] == "authors") and 0.5 < share <= 1.0
        assert r["pct_of_peak"] == pytest.approx(100 * r["tflops"] * share / peak["tflops"])
    assert rows["authors"]["speedup_vs_authors"] == 1.0
    ratio = rows["fast"]["images_per_s"] / rows["authors"]["images_per_s"]
    assert rows["fast"]["speedup_vs_authors"] == pytest.approx(ratio)
    assert f"{ratio:.2f}x" in out
    assert md.read_text().strip() == out.strip()
    assert main(args) == 0  # --md appends
    assert md.read_text().count("**EBM-3**") == 2


def test_baseline_precision_runs_the_authors_row_in_its_own(tmp_path, capsys):
    """--baseline-precision: the authors' row in its precision, beside the others in
    --precision, each against its own precision's peak."""
    js = tmp_path / "r.json"
    args = ["bench", "--device", "cpu", "--method", "ebm", "--model", "small", "--batch-size",
            "2", "--steps", "1", "--repeats", "1", "--backends", "authors",
            "--baseline-precision", "bf16", "--json", str(js)]  # fmt: skip
    assert main(args) == 0
    res = json.loads(js.read_text())
    assert res["baseline_precision"] == "bf16" and res["rows"][0]["precision"] == "bf16"
    assert set(res["peaks"]) == {"fp32", "bf16"}
    assert "| authors (bf16) |" in capsys.readouterr().out


def test_ddpm_bench_has_a_diffusers_column_where_installed(tmp_path, capsys):
    pytest.importorskip("diffusers", reason="diffusers is the third DDPM column")
    js = tmp_path / "r.json"
    args = ["bench", "--device", "cpu", "--method", "ddpm", "--model", "small", "--batch-size",
            "2", "--steps", "2", "--repeats", "1", "--backends", "authors,diffusers",
            "--json", str(js)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["authors", "diffusers"]
    assert "| diffusers |" in capsys.readouterr().out


def test_profile_lists_where_the_time_goes(tmp_path, capsys):
    js = tmp_path / "r.json"
    args = ["bench", "--device", "cpu", "--method", "ebm", "--model", "small", "--batch-size",
            "2", "--steps", "2", "--repeats", "1", "--backends", "authors", "--profile", "3",
            "--json", str(js)]  # fmt: skip
    assert main(args) == 0
    prof = json.loads(js.read_text())["rows"][0]["profile"]
    assert prof["clock"] == "cpu" and prof["total_ms"] > 0 and len(prof["top"]) == 3
    ms = [e["ms"] for e in prof["top"]]
    assert ms == sorted(ms, reverse=True) and 0 < sum(e["pct"] for e in prof["top"]) <= 100.01
    # the EBM's time is convolutions and their input gradients
    assert any("convolution" in e["name"] for e in prof["top"])
    out = capsys.readouterr().out
    assert "Where the time goes, `authors`" in out and "| kernel or op | calls | ms | % |" in out


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--backends", "authors,bogus"], "bogus"),
        (["--batch-size", "0"], "--batch-size"),
        (["--image-size", "30"], "--image-size"),
        (["--steps", "0"], "--steps"),
        (["--method", "ddpm", "--steps", "1000"], "--steps"),
        (["--precision", "bf16"], "bf16"),
        (["--backends", "diffusers"], "nothing to time"),
        (["--device", "tpu"], "--device"),
        (["--profile", "-1"], "--profile"),
    ],
)
def test_bad_flags_exit_2(extra, says, capsys, monkeypatch):
    from puregen_fast import runtime

    monkeypatch.setattr(runtime, "_cpuinfo", lambda: {"flags": "avx2 fma"})  # no bf16 units
    base = ["bench", "--device", "cpu", "--model", "small", "--batch-size", "2", "--steps", "2"]
    try:
        rc = main(base + extra)
    except SystemExit as e:  # a number outside its flag's range is refused while parsing
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert "puregen-fast bench: error:" in err and says in err


def test_compile_mode_is_a_choice(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cpu", "--compile-mode", "reduce-overhead"])
    assert e.value.code == 2 and "--compile-mode" in capsys.readouterr().err


def _fake_nvml(monkeypatch, power_ok: bool) -> None:
    def power(handle):
        if not power_ok:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 250_000  # mW

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: object(),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97),
        nvmlDeviceGetPowerUsage=power,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)


@pytest.mark.parametrize("power_ok", [True, False])
def test_nvml_sampler(monkeypatch, power_ok):
    _fake_nvml(monkeypatch, power_ok)
    errors = []
    monkeypatch.setattr("threading.excepthook", lambda a: errors.append(a.exc_value))
    nv = _NvmlSampler(0)
    with nv:
        import time

        time.sleep(0.12)
    assert not errors
    if power_ok:
        assert nv.summary() == {"gpu_util_pct": 97, "power_w": 250.0}
    else:
        assert nv.summary() is None
