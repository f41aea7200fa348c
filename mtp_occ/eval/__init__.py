"""Evaluation: benchmarks (local jsonl or the hub), prompt templates, avg@k / pass@k / maj@k with bootstrap
CIs, the eval runner that saves every sample, and a paired comparison of two runs
(`python -m mtp_occ.eval.compare RUN_A RUN_B`)."""
