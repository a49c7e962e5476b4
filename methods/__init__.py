"""One module per method; importing this package registers them all (see evalkit.sampling.method)."""

from methods import vanilla  # noqa: F401
from methods import attend_and_excite  # noqa: F401
from methods import composable_diffusion  # noqa: F401
from methods import syngen  # noqa: F401
from methods import attention_regulation  # noqa: F401
from methods import conform  # noqa: F401
from methods import dense_diffusion  # noqa: F401
from methods import separate_and_enhance  # noqa: F401
from methods import best_of_n  # noqa: F401
