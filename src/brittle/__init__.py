"""brittle: measure how brittle the safety alignment of chat LLMs is, weight by weight."""

import os as _os

# OpenMP worker threads that spin while waiting make torch ~10x slower on a CPU shared with another busy
# process (measured here: generation 12.6 s -> 159 s); passive waiting costs nothing measurable on an idle
# machine. Only takes effect if set before torch is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
