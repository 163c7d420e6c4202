"""The engine behind :func:`explaind_tl.explain` (docs/design.md §1-4, §6).

:mod:`.api` runs ``validate -> plan -> sweep -> assemble``: :mod:`.options` and :mod:`.validate`
check every argument before any work, :mod:`.plan` fixes the rows, axes and queries,
:mod:`.setup` builds the shared state (parameter layout, query function, component index),
:mod:`.certify` is the certified, kink-aware quadrature (``φ̂_s`` of one step, the step passed as
an argument), :mod:`.realized` and :mod:`.seen` are the two sweeps (the seen one is the adjoint
recursion), :mod:`.resume` persists partial sums and :mod:`.assemble` turns them into an
:class:`explaind_tl.Attribution` with its certificate.

This package imports none of its modules itself (``explaind_tl.explain`` is the function; the
package is named ``engine`` so that the two never shadow each other).
"""
