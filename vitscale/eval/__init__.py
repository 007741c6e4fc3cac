"""Evaluation: linear probe, kNN, few-shot (frozen features) and the robustness suite (occlusion, patch shuffle,
adversarial patch, common corruptions) against a ResNet-18 baseline. See docs/eval.md. (Fine-tuning and linear
probing at scale are modes of `vitscale train`: docs/finetune.md.)

Where things live: features.py (Accelerator, model loading, feature extraction and gathering), probes.py,
classify.py (plain top-1), robustness.py + corruptions.py (perturbations and curves), baseline.py
(the CNN), plots.py, run.py + robust_run.py (orchestration, JSON, summary), cli.py (argparse only).
Nothing is imported here, so ``vitscale --help`` stays light; import the submodules.
"""
