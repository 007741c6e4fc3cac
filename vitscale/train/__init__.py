"""Training: ``loop.py`` (``Trainer``, ``train()``: the loop), ``state.py`` (``TrainState``, ``Window``,
``StepOutput``, RNG state), ``preemption.py`` (signals -> a checkpoint at an agreed step), ``resume.py`` (which checkpoint to continue and whether this config may).

    from vitscale.train import train
    summary = train(cfg)            # resolves the config for this launch, trains or resumes, evaluates
"""
from vitscale.train.loop import Rollback, Trainer, train
from vitscale.train.resume import ResumePoint, check_resumable, find_resume
from vitscale.train.preemption import Preemption
from vitscale.train.state import StepOutput, TrainState, Window

__all__ = ["Preemption", "ResumePoint", "Rollback", "StepOutput", "TrainState", "Trainer", "Window",
           "check_resumable", "find_resume", "train"]
