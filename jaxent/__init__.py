"""jaxent: cross-entropy losses for JAX.

Every loss is a pure, jit-compiled function of arrays whose arithmetic runs in
float32 (float64 for float64 input) in the stable log-sum-exp form. See SPEC-level
semantics in each function's docstring and the README's "Semantics" section.
"""

from ._binary import binary_cross_entropy as binary_cross_entropy
from ._binary import focal_loss as focal_loss
from ._categorical import CrossEntropyAux as CrossEntropyAux
from ._categorical import cross_entropy as cross_entropy
from ._categorical import soft_cross_entropy as soft_cross_entropy
from ._divergence import kl_divergence as kl_divergence
from ._validate import validate as validate
from .linear import linear_cross_entropy as linear_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyAux",
    "__version__",
    "binary_cross_entropy",
    "cross_entropy",
    "focal_loss",
    "kl_divergence",
    "linear_cross_entropy",
    "soft_cross_entropy",
    "validate",
]
