"""`python -m analysis --run-root DIR --out DIR`: `python -m analysis.tables`, tables and figures."""

from analysis.tables import main

main()
