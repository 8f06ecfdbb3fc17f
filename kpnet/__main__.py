"""`python -m kpnet` runs the command line (the form `torchrun … -m kpnet train RECIPE` starts)."""

from kpnet.cli import main

main()
