from .auto import AutoLinearSolver as AutoLinearSolver
from .base import AbstractLinearSolver as AbstractLinearSolver
from .bicgstab import BiCGStab as BiCGStab
from .cg import CG as CG, NormalCG as NormalCG
from .cholesky import Cholesky as Cholesky
from .diagonal import Diagonal as Diagonal
from .gmres import GMRES as GMRES
from .kronecker import Kronecker as Kronecker
from .lsmr import LSMR as LSMR
from .lu import LU as LU
from .minres import MINRES as MINRES
from .normal import Normal as Normal
from .qr import QR as QR
from .svd import SVD as SVD
from .triangular import Triangular as Triangular
from .tridiagonal import Tridiagonal as Tridiagonal
from .woodbury import Woodbury as Woodbury
