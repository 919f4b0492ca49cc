"""``python -m xpcnn`` runs the command line."""

from .apps.cli import main

main()
