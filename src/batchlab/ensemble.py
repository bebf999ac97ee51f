"""The former name of `batchlab.replicas`, kept so that existing imports keep working."""

from .replicas import *  # noqa: F401,F403
from .replicas import __all__  # noqa: F401
from .replicas.fit import _make_replica  # noqa: F401
from .replicas.vectorized import _Pass  # noqa: F401
