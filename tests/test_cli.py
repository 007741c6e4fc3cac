"""The command line: key=value overrides may come before, between or after options (argparse alone fills a
``nargs="*"`` positional from one run of arguments and reports the rest as unrecognised)."""
import pytest

from conftest import ROOT
from vitscale.cli import _interleaved, build_parser, main


def _parse(argv):
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    return args, _interleaved(parser, args, extra)


@pytest.mark.parametrize("argv, dest, expected", [
    (["train", "--config", "c.yaml", "train.steps=5", "--local_rank=0", "run.name=x"], "overrides",
     ["train.steps=5", "run.name=x"]),
    (["train", "a.b=1", "--config", "c.yaml", "c.d=2"], "overrides", ["a.b=1", "c.d=2"]),
    (["sweep", "--config", "c.yaml", "model.pos_embed=learn,none", "--seeds", "2", "train.steps=5",
      "--finetune-set", "train.steps=200", "x.y=1"], "grid", ["model.pos_embed=learn,none", "train.steps=5", "x.y=1"]),
    (["bench", "--config", "c.yaml", "data.batch_size=8", "--threads", "1", "train.precision=fp32"], "overrides",
     ["data.batch_size=8", "train.precision=fp32"]),
    (["plan", "--config", "c.yaml", "--gpus", "8", "model.name=vit_large_patch16"], "overrides",
     ["model.name=vit_large_patch16"]),
])
def test_overrides_may_be_interleaved_with_options(argv, dest, expected):
    args, extra = _parse(argv)
    assert getattr(args, dest) == expected and extra[:1] in ([], ["--local_rank=0"])
    if argv[0] == "sweep":  # an option's own key=value stays the option's value
        assert args.finetune_set == ["train.steps=200"] and args.seeds == 2


def test_sweep_dry_run_takes_an_override_after_an_option(capsys):
    assert main(["sweep", "--config", "configs/demo.yaml", "model.pos_embed=learn,none", "--seeds", "2",
                 "train.steps=5", "--dry-run"]) == 0
    cells = [line for line in capsys.readouterr().out.splitlines() if "train.steps=5" in line]
    assert len(cells) == 4  # 2 values x 2 seeds, each with the override that came after --seeds


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--config", "configs/demo.yaml", "--no-such-option", "train.steps=5"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def _error(argv, capsys, monkeypatch):
    """(exit code, stderr) of `vitscale ARGV` as a user sees it (no traceback: VITSCALE_DEBUG unset)."""
    monkeypatch.setenv("VITSCALE_DEBUG", "")
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_what_is_no_checkpoint_is_named_for_what_it_is(tmp_path, capsys, monkeypatch):
    """A missing path, a file and a run without checkpoints all said 'not a complete checkpoint (no COMPLETE
    marker (a save was interrupted))'; each now says what it is, for export and for train.resume=PATH alike. A
    checkpoint folder whose save was interrupted keeps that message."""
    from vitscale.distributed.checkpoint import CheckpointManager

    run, file, interrupted = tmp_path / "emptyrun", tmp_path / "notckpt.txt", tmp_path / "r" / "step_00000002"
    (run / "checkpoints").mkdir(parents=True)
    file.write_text("x")
    interrupted.mkdir(parents=True)
    (interrupted / "rank_00000.pt").write_bytes(b"partial")
    cases = {tmp_path / "nonexistent": f"checkpoint not found: {tmp_path / 'nonexistent'}",
             file: f"{file} is a file, not a checkpoint folder",
             run: f"no checkpoint in {run} (the run has not saved one yet)",
             run / "checkpoints": f"no checkpoint in {run / 'checkpoints'} (the run has not saved one yet)",
             interrupted: f"{interrupted} is not a complete checkpoint (no COMPLETE marker (a save was interrupted))"}
    manager = CheckpointManager(run / "checkpoints", rank=0)
    for path, line in cases.items():
        rc, err = _error(["export", str(path), str(tmp_path / "w.safetensors")], capsys, monkeypatch)
        assert (rc, err) == (2, f"vitscale: error: {line}\n")
        with pytest.raises(FileNotFoundError) as e:
            manager.find(str(path))
        assert str(e.value) == f"train.resume={path}: {line}"
    (interrupted.parent / "latest").write_text("step_00000001\n")  # a run folder where one checkpoint is wanted
    with pytest.raises(FileNotFoundError, match=r"is a run folder, not a checkpoint \(its latest: .*step_00000001\)"):
        manager.find(str(interrupted.parent))
    assert not (tmp_path / "w.safetensors").exists()


def test_plot_reports_the_file_it_wrote(tmp_path, capsys):
    """--out without a suffix: matplotlib writes OUT.png, and the line said 'wrote OUT'."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "d2")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'd2.png'}: ")
    assert (tmp_path / "d2.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "d2").exists()


def test_deepspeed_refusing_its_config_is_one_line_naming_the_field():
    """DeepSpeed checks its config with pydantic, whose first line ("1 validation error for DeepSpeedZeroConfig")
    named no field."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from vitscale.cli import one_line

    with pytest.raises(ValueError) as e:
        DeepSpeedZeroConfig(sub_group_size="abc", stage=7)
    line = one_line(e.value)
    assert "\n" not in line and line.startswith("DeepSpeedZeroConfig (engine.ds_config) refused: "), line
    assert "sub_group_size: " in line and "(got 'abc')" in line and "stage: " in line, line


@pytest.mark.parametrize("var", ["RANK", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"])
def test_the_loading_banner_is_printed_by_the_first_process_only(var, tmp_path, capsys, monkeypatch):
    """Under srun (SLURM_PROCID) or mpirun every rank printed it: one line per GPU of the job."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    missing = str(tmp_path / "none.yaml")
    main(["train", "--config", missing])
    assert "vitscale train: checking" in capsys.readouterr().out
    monkeypatch.setenv(var, "3")
    main(["train", "--config", missing])
    assert "vitscale train: checking" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["plan", "--config", "configs/demo.yaml", "--device", "cpu", "--gpus", "0"], "--gpus and --nodes must be >= 1"),
    (["bench", "--what", "data", "data.batch_size=8", "--images", "16"], "need --config"),
    (["eval", "accuracy", "x", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["eval", "fewshot", "x", "--fewshot-seeds", "0"], "--fewshot-seeds: must be at least 1"),
    (["check-shards", "x.tar", "--config", "configs/demo.yaml"], "SPEC and --config exclude each other"),
    (["check-shards", "--config", "configs/demo.yaml", "--label-key", "txt"], "--label-key and --config exclude"),
    (["check-shards", "x.tar", "--set", "data.label_key=txt"], "--set overrides a --config"),
])
def test_flags_that_could_not_work_are_one_line(argv, words, capsys, monkeypatch):
    """plan --gpus 0 divided by zero (a traceback); bench's overrides without --config were dropped without a word;
    eval --batch-size 0 put a whole split in one batch; check-shards --config dropped a SPEC, --label-key or
    --cache-dir given beside it (and --set without it) without a word."""
    monkeypatch.chdir(ROOT)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err
