"""pipeline layer: each stage's wiring (params → library calls), one module per stage, and ``run_stage``.

``stages/<name>.py`` (DVC), ``pipelines/flows.py`` (Prefect) and ``emassist.cli`` all call these same steps.
"""
