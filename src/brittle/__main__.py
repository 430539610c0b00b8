"""``python -m brittle ...``: the command line, also under a launcher (``accelerate launch -m brittle score ...``,
``torchrun -m brittle ...``; see :mod:`brittle.distributed`)."""

from .cli import app

app(prog_name="brittle")
