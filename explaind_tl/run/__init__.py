"""The run: a training run on disk, recorded and replayed exactly (docs/design.md §5).

Bottom to top: :mod:`.storage` (crash-safe files, the run-directory lock), :mod:`.format` (what a
run directory holds: names, manifest, checkpoint and record encodings), :mod:`.rundir` (which
files are ours, overwrite and cleanup), :mod:`.data` (the training set), :mod:`.step` (the one
training step shared by recording and replay), :mod:`.trajectory` (loading and replay),
:mod:`.recorder` (recording, resume) and :mod:`.training` (a convenience loop).

This package imports none of its modules itself: ``import explaind_tl.run.storage`` loads the
storage layer and nothing above it.
"""
