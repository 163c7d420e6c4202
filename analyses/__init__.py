"""Studies built on ``explaind_tl``: each sub-package reproduces one analysis end to end."""
