"""The command line: key=value overrides may come before, between or after options (argparse alone fills a
``nargs="*"`` positional from one run of arguments and reports the rest as unrecognised)."""
import pytest

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
