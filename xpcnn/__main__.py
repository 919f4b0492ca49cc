"""``python -m xpcnn`` runs the command line."""

from .cli import main

main()
