"""wandb mode resolution: a machine without a wandb login gets offline logging, never a prompt or a crash."""
from vitscale.logging.trackers import Tracker, resolve_mode


def test_auto_mode_is_offline_without_a_login_and_online_with_one(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert resolve_mode("auto") == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins, as wandb's own convention
    assert resolve_mode("online") == "disabled"


def test_non_zero_ranks_and_disabled_mode_write_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for enabled, mode in ((False, "offline"), (True, "disabled")):
        t = Tracker(enabled=enabled, mode=mode, project="p", entity=None, name="n", run_dir=tmp_path, config={})
        t.log({"loss": 1.0}, step=1)
        t.summarize({"val_top1": 0.5})
        t.finish()
        assert t.run_id is None
    assert list(tmp_path.iterdir()) == []


def test_an_online_run_without_a_reachable_server_goes_offline_and_trains(tmp_path, data_cache):
    """logging.wandb.mode=online (or auto with an API key) where wandb's server cannot be reached: wandb.init waited
    90 s, then its CommError ended the run with a traceback. Now one warning, and the run logs offline."""
    from conftest import run_cli, train_args

    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens
           "WANDB_INIT_TIMEOUT": "5"}
    r = run_cli(train_args(tmp_path, "w", data_cache, "train.steps=2", "logging.wandb.mode=online"), cwd=tmp_path,
                env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: wandb could not start an online run (" in r.stderr and "logging offline to" in r.stderr
    assert len(list((tmp_path / "w" / "wandb").glob("offline-run-*"))) == 1


def test_mfu_peak_is_the_named_gpus(monkeypatch):
    """Any name holding "H100" got the SXM part's 989 TFLOP/s: an H100 PCIe (756) showed MFU 24% low."""
    import torch

    from vitscale.logging.metrics import device_peak_flops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, tflops in (("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H100 80GB HBM3", 989),
                         ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA GeForce RTX 4090", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert device_peak_flops() == (tflops * 1e12 if tflops else None), name
    assert device_peak_flops(100.0) == 100e12  # logging.peak_tflops wins
