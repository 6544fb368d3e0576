"""`python -m tandem.cli` runs the `tandem` command."""

from tandem.cli.main import main

main()
