"""`python -m kpnet.cli` runs the command line."""

from kpnet.cli import main

main()
