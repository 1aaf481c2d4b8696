"""Linear solves and linear least squares in JAX and Equinox."""

from importlib import metadata as _metadata

from . import internal as internal
from ._linear_solve import invert as invert, linear_solve as linear_solve
from ._operator import (
    AbstractLinearOperator as AbstractLinearOperator,
    AddLinearOperator as AddLinearOperator,
    BlockDiagonalLinearOperator as BlockDiagonalLinearOperator,
    BlockLinearOperator as BlockLinearOperator,
    ComposedLinearOperator as ComposedLinearOperator,
    DiagonalLinearOperator as DiagonalLinearOperator,
    DivLinearOperator as DivLinearOperator,
    FunctionLinearOperator as FunctionLinearOperator,
    IdentityLinearOperator as IdentityLinearOperator,
    JacobianLinearOperator as JacobianLinearOperator,
    KroneckerLinearOperator as KroneckerLinearOperator,
    LowRankUpdateLinearOperator as LowRankUpdateLinearOperator,
    MatrixLinearOperator as MatrixLinearOperator,
    MulLinearOperator as MulLinearOperator,
    NegLinearOperator as NegLinearOperator,
    PyTreeLinearOperator as PyTreeLinearOperator,
    SparseLinearOperator as SparseLinearOperator,
    TaggedLinearOperator as TaggedLinearOperator,
    TangentLinearOperator as TangentLinearOperator,
    TridiagonalLinearOperator as TridiagonalLinearOperator,
)

# The dispatching functions come from `base` directly: the package `_operator` has
# submodules named `diagonal` and `tridiagonal` that would shadow them there.
from ._operator.base import (
    conj as conj,
    diagonal as diagonal,
    has_unit_diagonal as has_unit_diagonal,
    is_diagonal as is_diagonal,
    is_lower_triangular as is_lower_triangular,
    is_negative_semidefinite as is_negative_semidefinite,
    is_positive_semidefinite as is_positive_semidefinite,
    is_symmetric as is_symmetric,
    is_tridiagonal as is_tridiagonal,
    is_upper_triangular as is_upper_triangular,
    linearise as linearise,
    materialise as materialise,
    tridiagonal as tridiagonal,
)
from ._solution import RESULTS as RESULTS, Solution as Solution
from ._solver import (
    AbstractLinearSolver as AbstractLinearSolver,
    AutoLinearSolver as AutoLinearSolver,
    BiCGStab as BiCGStab,
    BlockDiagonal as BlockDiagonal,
    CG as CG,
    Cholesky as Cholesky,
    Diagonal as Diagonal,
    FGMRES as FGMRES,
    FlexibleCG as FlexibleCG,
    GMRES as GMRES,
    Kronecker as Kronecker,
    LSMR as LSMR,
    LU as LU,
    MINRES as MINRES,
    Normal as Normal,
    NormalCG as NormalCG,
    PipelinedCG as PipelinedCG,
    QR as QR,
    Schur as Schur,
    SVD as SVD,
    Triangular as Triangular,
    Tridiagonal as Tridiagonal,
    Woodbury as Woodbury,
)
from ._tags import (
    diagonal_tag as diagonal_tag,
    lower_triangular_tag as lower_triangular_tag,
    negative_semidefinite_tag as negative_semidefinite_tag,
    positive_semidefinite_tag as positive_semidefinite_tag,
    symmetric_tag as symmetric_tag,
    transpose_tags as transpose_tags,
    transpose_tags_rules as transpose_tags_rules,
    tridiagonal_tag as tridiagonal_tag,
    unit_diagonal_tag as unit_diagonal_tag,
    upper_triangular_tag as upper_triangular_tag,
)


try:
    __version__ = _metadata.version("lineax")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.2.0"

from ._preconditioner import (
    AbstractPreconditioner as AbstractPreconditioner,
    BlockJacobiPreconditioner as BlockJacobiPreconditioner,
    ChebyshevPreconditioner as ChebyshevPreconditioner,
    ILUPreconditioner as ILUPreconditioner,
    IncompleteCholeskyPreconditioner as IncompleteCholeskyPreconditioner,
    JacobiPreconditioner as JacobiPreconditioner,
    MultigridPreconditioner as MultigridPreconditioner,
    NeumannPreconditioner as NeumannPreconditioner,
    SSORPreconditioner as SSORPreconditioner,
)
