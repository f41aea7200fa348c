"""Pure RL math: GRPO/DAPO/GSPO losses (`grpo`), the OCC estimator (`occ`), exact diagnostics."""
