"""`python -m neod` runs the daemon, like the `neod` command."""

from neod.cli.daemon import main

main()
