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
