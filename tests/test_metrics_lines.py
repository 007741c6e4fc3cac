"""metrics.jsonl lines a crash, an edit or a copy damaged: skipped (or one line naming path:line), never a traceback."""
import pytest

from vitscale.logging.metrics import read_metrics
from vitscale.logging.plot import plot_run

GOOD = b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


@pytest.mark.parametrize("bad", [b"[" * 100_000, b'{"step": 3, "loss": "\xff"}', b"\xff\xfe{}"])
def test_an_overnested_or_non_utf8_line_is_skipped_or_named(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD + bad + b"\n" + b'{"step": 4, "loss": 1.0}\n')
    # before: RecursionError, or a UnicodeDecodeError naming no file
    assert [r["step"] for r in read_metrics(path, strict=False)] == [1, 2, 4]
    with pytest.raises(ValueError, match=r"metrics.jsonl:3 is not valid JSON"):
        read_metrics(path)


@pytest.mark.parametrize("step", ["[1]", "null", "1e999", "2.5", "true", '"7"'])
def test_plot_skips_a_training_line_whose_step_is_not_a_whole_number(tmp_path, step):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(GOOD + f'{{"step": {step}, "loss": 1.0}}\n'.encode()
                                        + b'{"step": 3, "loss": 1.2, "lr": ' + b"9" * 400 + b"}\n"
                                        + b'{"step": 3, "val_top1": ' + b"9" * 400 + b"}\n")
    res = plot_run(run, tmp_path / "m.png")  # before: TypeError / OverflowError tracebacks
    assert res["steps"] == 3
