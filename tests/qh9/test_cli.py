"""``metaham qh9 ...``: summaries, JSON last lines, exit code 2 on bad input."""
import json

from metaham.cli import main


def _json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1]), "\n".join(out[:-1])


def test_generate_and_info(tmp_path, capsys):
    out = tmp_path / "cli.db"
    assert main(["qh9", "generate", "--out", str(out), "--molecules", "H2", "--json"]) == 0
    result, summary = _json(capsys)
    assert result["computed"] == 1 and result["total"] == 1 and "1 geometries computed" in summary
    assert main(["qh9", "info", str(out), "--json"]) == 0
    info, summary = _json(capsys)
    assert {"format": "qh9-stable", "n": 1, "elements": ["H"]}.items() <= info.items()
    assert info["orbitals"]["max"] == 10 and "b3lyp5/def2-svp" in summary


def test_progress_bars_stay_off_a_log_file_and_off_with_no_progress(tmp_path, capsys, monkeypatch):
    """Bars go to stderr only when it is a terminal (a batch job's log holds none); --no-progress hides them on a
    terminal too. The captured stderr here is not a terminal, then pretends to be one."""
    assert main(["qh9", "generate", "--out", str(tmp_path / "a.db"), "--molecules", "H2"]) == 0
    assert "SCF" not in capsys.readouterr().err
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert main(["qh9", "generate", "--out", str(tmp_path / "b.db"), "--molecules", "H2"]) == 0
    assert "SCF" in capsys.readouterr().err
    assert main(["qh9", "generate", "--out", str(tmp_path / "c.db"), "--molecules", "H2", "--no-progress"]) == 0
    assert "SCF" not in capsys.readouterr().err


def test_baseline(generated, capsys):
    path, _ = generated
    assert main(["qh9", "baseline", "--data", str(path), "--json"]) == 0
    result, summary = _json(capsys)
    assert result["split_by"] == "dynamic-geo" and result["part"] == "test" and result["n"] == 2
    minao, mean = result["baselines"]["minao"], result["baselines"]["mean"]
    for scores in (minao, mean):
        assert scores["n"] == 2
        for key in ("h_mae_ueh", "h_diag_mae_ueh", "h_offdiag_mae_ueh", "eps_mae_ueh", "psi_cos_pct"):
            assert scores[key] > 0
    assert 1e3 < minao["h_mae_ueh"] < 1e5 and minao["psi_cos_pct"] < 100
    assert "minao" in summary and "psi %" in summary


def test_bad_input_exits_2_with_a_message(tmp_path, capsys, generated):
    foreign = tmp_path / "foreign.db"
    foreign.write_text("hello")
    assert main(["qh9", "info", str(foreign)]) == 2
    assert "foreign.db: not a QH9 file" in capsys.readouterr().err
    lmdb_dir = tmp_path / "x.lmdb"
    lmdb_dir.mkdir()
    (lmdb_dir / "data.mdb").write_bytes(b"\0" * 16 + b"\xde\xc0\xef\xbe" + b"\0" * 100)
    assert main(["qh9", "info", str(lmdb_dir)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["qh9", "generate", "--out", str(tmp_path / "s.db"), "--molecules", "H2", "--basis", "def2-tzvp"]) == 2
    assert "basis 'def2-tzvp' is not supported" in capsys.readouterr().err
    path, _ = generated
    assert main(["qh9", "baseline", "--data", str(path), "--split-by", "stable-ood"]) == 2
    assert "the 'test' part of the stable-ood split is empty" in capsys.readouterr().err
