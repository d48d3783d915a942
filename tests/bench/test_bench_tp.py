"""``metaham bench tp``: the JSON a user reads, with the cuequivariance backend timed beside ours, and its errors."""
import json

import pytest

from metaham.cli import main
from metaham.nn import cue_backend

SMALL = ["bench", "tp", "--edges", "40", "--mul", "4", "--repeats", "1", "--kept-sets", "1", "--threads", "1",
         "--device", "cpu"]


def test_bench_tp_times_the_cuequivariance_backend_beside_ours(capsys):
    pytest.importorskip("cuequivariance_torch")
    assert main([*SMALL, "--backend", "cuequivariance", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["device"] == "cpu" and result["settings"]["backend"] == "cuequivariance"
    for size in ("l2", "l4"):
        r = result[size]
        assert r["ms_cue_dense"] > 0 and r["ms_cue_fixed"] > 0 and r["cue_method"] == "naive"
        assert r["speedup_cue_fixed_vs_ours_fixed"] == pytest.approx(r["ms_ours_fixed"] / r["ms_cue_fixed"])
    assert "cuequivariance (naive)" in "\n".join(out[:-1])


def test_bench_tp_without_the_backend_reports_no_cue_keys_and_a_missing_library_exits_2(capsys, monkeypatch):
    assert main([*SMALL, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "ms_cue_fixed" not in result["l2"] and result["settings"]["backend"] == "torch"
    monkeypatch.setattr(cue_backend, "available", lambda: False)
    assert main([*SMALL, "--backend", "cuequivariance"]) == 2
    assert "pip install cuequivariance-torch" in capsys.readouterr().err


def test_a_kernel_that_refuses_the_products_is_one_line_exit_2(capsys, monkeypatch):
    pytest.importorskip("cuequivariance_torch")

    def refuse(*args, **kwargs):
        raise NotImplementedError("Fused TP does not support this product")

    monkeypatch.setattr(cue_backend, "CuePathContraction", refuse)
    assert main([*SMALL, "--backend", "cuequivariance"]) == 2
    err = capsys.readouterr().err
    assert "--backend cuequivariance: Fused TP does not support" in err and "Traceback" not in err
