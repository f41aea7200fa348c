"""`python -m analysis --run-root DIR --out DIR`: the same as `python -m analysis.tables` (tables + figures)."""

from analysis.tables import main

main()
