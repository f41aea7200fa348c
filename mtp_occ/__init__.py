"""mtp_occ: joint Multi-Token Prediction + RL-from-verifiable-rewards training with Optimal
Coefficient Calibration (OCC).

`import mtp_occ` is cheap: torch, transformers, vLLM, DeepSpeed and wandb are imported by the modules
that use them. Entry points: `python -m mtp_occ.run` (train, then evaluate), `python -m mtp_occ.eval`.
"""

__version__ = "0.1.0"
