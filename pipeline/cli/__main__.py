"""`python -m pipeline.cli`: the same as the `cbir` command."""

from pipeline.cli import main

main()
