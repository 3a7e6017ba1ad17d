"""``python -m lsfov``: the command line, as the ``lsfov`` script."""
from .cli import main

main(prog_name="lsfov")
