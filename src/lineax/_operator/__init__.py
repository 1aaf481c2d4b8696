from .arithmetic import (
    AddLinearOperator as AddLinearOperator,
    ComposedLinearOperator as ComposedLinearOperator,
    DivLinearOperator as DivLinearOperator,
    MulLinearOperator as MulLinearOperator,
    NegLinearOperator as NegLinearOperator,
)
from .base import AbstractLinearOperator as AbstractLinearOperator
from .block import BlockLinearOperator as BlockLinearOperator
from .block_diagonal import BlockDiagonalLinearOperator as BlockDiagonalLinearOperator
from .diagonal_operator import DiagonalLinearOperator as DiagonalLinearOperator
from .function import FunctionLinearOperator as FunctionLinearOperator
from .identity import IdentityLinearOperator as IdentityLinearOperator
from .jacobian import JacobianLinearOperator as JacobianLinearOperator
from .kronecker import KroneckerLinearOperator as KroneckerLinearOperator
from .low_rank import LowRankUpdateLinearOperator as LowRankUpdateLinearOperator
from .matrix import MatrixLinearOperator as MatrixLinearOperator
from .pytree import PyTreeLinearOperator as PyTreeLinearOperator
from .sparse import SparseLinearOperator as SparseLinearOperator
from .tagged import TaggedLinearOperator as TaggedLinearOperator
from .tangent import TangentLinearOperator as TangentLinearOperator
from .tridiagonal_operator import TridiagonalLinearOperator as TridiagonalLinearOperator
