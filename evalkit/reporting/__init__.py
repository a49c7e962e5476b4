"""Aggregation of per-image scores (aggregate.py) and the written report (render.py: README.md, index.html, plots,
image grids)."""
