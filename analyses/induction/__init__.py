"""The induction-heads study (``explaind-tl induction``): a 2-layer attention-only transformer
trained with the trajectory recorder through the induction phase change on generated sequences,
measured with the progress measures of Olsson et al. (2022) and explained with ExPLAIND.

Modules: :mod:`.task` (presets, data), :mod:`.scores` (previous-token, induction and ICL
scores), :mod:`.pipeline` (train, measure, explain, save), :mod:`.report` (``report.md``).
"""
