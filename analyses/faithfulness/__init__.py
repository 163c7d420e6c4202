"""Faithfulness of attributions (``explaind-tl faithfulness``): the linear datamodeling score of
training-example scores against retraining on random subsets (:mod:`.harness`, :mod:`.lds`,
:mod:`.methods`, :mod:`.report`)."""
