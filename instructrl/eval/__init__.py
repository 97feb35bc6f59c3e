"""Evaluation: pure measurements (`metrics.py`) and the tables and plots built from an
eval stage's summary (`plots.py`). The `eval` stage driver is `instructrl/stages/evaluate.py`.
"""
