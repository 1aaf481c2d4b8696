"""Semi-public helpers used by libraries built on lineax (Optimistix, Diffrax).

No stability promise beyond that of the published `lineax.internal`.
"""

from ._misc import (
    complex_to_real_dtype as complex_to_real_dtype,
    default_floating_dtype as default_floating_dtype,
)
from ._norm import (
    max_norm as max_norm,
    rms_norm as rms_norm,
    sum_squares as sum_squares,
    tree_dot as tree_dot,
    two_norm as two_norm,
)
from ._primitive import linear_solve_p as linear_solve_p
from ._solver._packing import (
    pack_structures as pack_structures,
    PackedStructures as PackedStructures,
    ravel_vector as ravel_vector,
    transpose_packed_structures as transpose_packed_structures,
    unravel_solution as unravel_solution,
)
