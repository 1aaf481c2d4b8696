from .arithmetic import (
    AddLinearOperator as AddLinearOperator,
    ComposedLinearOperator as ComposedLinearOperator,
    DivLinearOperator as DivLinearOperator,
    MulLinearOperator as MulLinearOperator,
    NegLinearOperator as NegLinearOperator,
)

# Imported last: the submodules `diagonal` and `tridiagonal` would otherwise shadow
# the functions of the same name.
from .base import (
    AbstractLinearOperator as AbstractLinearOperator,
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
from .diagonal import DiagonalLinearOperator as DiagonalLinearOperator
from .function import FunctionLinearOperator as FunctionLinearOperator
from .identity import IdentityLinearOperator as IdentityLinearOperator
from .jacobian import JacobianLinearOperator as JacobianLinearOperator
from .matrix import MatrixLinearOperator as MatrixLinearOperator
from .pytree import PyTreeLinearOperator as PyTreeLinearOperator
from .tagged import TaggedLinearOperator as TaggedLinearOperator
from .tangent import TangentLinearOperator as TangentLinearOperator
from .tridiagonal import TridiagonalLinearOperator as TridiagonalLinearOperator
