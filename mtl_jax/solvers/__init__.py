"""Solvers of the MTRL objective: the shared base, accelerated proximal gradient, the alternation."""
from mtl_jax.data.sites import Sites
from mtl_jax.solvers import apg
from mtl_jax.solvers.base import register_exportable

# The pytree node types that the solver programs take and return, so that those programs can be
# stored on disk by the persistent layer of base.compiled.
register_exportable(Sites, apg.APGState, apg.PrimalCarry, apg.APGResult)
