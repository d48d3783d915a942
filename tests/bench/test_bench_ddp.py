"""``metaham bench ddp``: both steps run on one process and on two spawned gloo ranks and report consistent
throughputs (no speed is asserted here: speed targets live in the benchmark's own report)."""
import json
from pathlib import Path

import pytest

from metaham.cli import main

CONFIG = Path(__file__).parents[2] / "configs" / "qh9.yaml"
SMALL_QH9 = ["--set", "model.node_irreps=8x0e+4x1o+4x2e", "--set", "model.layers=1", "--set", "model.lmax_sh=2",
             "--set", "model.head_mul=4"]


@pytest.mark.slow  # eight spawned processes importing torch and e3nn: ~40 s on a busy 2-core machine
def test_ddp_bench_reports_both_halves_on_one_and_two_ranks(capsys):
    argv = ["bench", "ddp", "--steps", "2", "--warmup", "1", "--repeats", "1", "--molecules", "3", "--tasks", "3",
            "--points", "5", "--hidden", "8", "--config", str(CONFIG), *SMALL_QH9, "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["ranks"] == 2 and result["target_scaling"] == 1.7 and result["repeats"] == 1
    for half in ("qh9", "meta"):
        assert result[half]["batch"] == 3
        for mode, suffix, parallel_batch in (("same_batch_per_rank", "", 6), ("same_global_batch", "_same_global_batch", 3)):
            part = result[half][mode]
            one, two = part["one"], part["parallel"]
            assert (one["batch"], two["batch"]) == (3, parallel_batch)
            # Two timed steps: the one process takes each of the two ranks' shards once in the first mode.
            assert one["samples_per_s"] == pytest.approx(2 * 3 / one["seconds"])
            assert two["samples_per_s"] == pytest.approx(2 * parallel_batch / two["seconds"])
            assert part["scalings"] == [part["scaling"]] == [result[f"scaling_{half}{suffix}"]]
            assert part["scaling"] == pytest.approx(two["samples_per_s"] / one["samples_per_s"])
            assert 0 <= one["allreduce_share"] < 0.1  # one process reduces nothing: only the call's own cost
            assert 0 < two["allreduce_share"] < 1
            assert part["target_met"] == (part["scaling"] >= 1.7)
    text = "\n".join(out[:-1])
    assert "in all-reduce" in text and "same batch per rank" in text and "same global batch" in text


def test_ddp_bench_needs_one_item_per_rank(capsys):
    assert main(["bench", "ddp", "--ranks", "4", "--tasks", "3"]) == 2
    assert "error: --tasks 3: each of the 4 ranks needs one at least" in capsys.readouterr().err
