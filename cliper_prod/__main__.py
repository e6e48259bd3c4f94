"""``python -m cliper_prod`` runs the CLI."""

from cliper_prod.commands import main

main()
