"""Analysis of mtp_occ runs, separate from the harness and free of torch.

    python -m analysis.tables --run-root runs/ --out analysis/out/     # tables + figures
    jupyter lab analysis/paper.ipynb                                    # the same, with commentary

`runs` loads runs (run dirs, wandb offline files, the wandb API) into one long pandas frame;
`tables` and `figures` build one table or figure per function from it.
"""
