from .base import AbstractPreconditioner as AbstractPreconditioner
from .block_jacobi import BlockJacobiPreconditioner as BlockJacobiPreconditioner
from .chebyshev import ChebyshevPreconditioner as ChebyshevPreconditioner
from .ilu import ILUPreconditioner as ILUPreconditioner
from .incomplete_cholesky import (
    IncompleteCholeskyPreconditioner as IncompleteCholeskyPreconditioner,
)
from .jacobi import JacobiPreconditioner as JacobiPreconditioner
from .multigrid import MultigridPreconditioner as MultigridPreconditioner
from .neumann import NeumannPreconditioner as NeumannPreconditioner
from .ssor import SSORPreconditioner as SSORPreconditioner
