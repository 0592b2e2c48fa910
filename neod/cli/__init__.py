"""Command lines: `neod` (the daemon, neod.cli.daemon) and `neoctl` (neod.cli.ctl)."""
