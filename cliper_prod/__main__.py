"""``python -m cliper_prod`` runs the CLI."""

from cliper_prod.cli import main

main()
