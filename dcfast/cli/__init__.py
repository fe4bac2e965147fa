"""The `dcfast` command line: the entry point and the bench subcommand (`main`), one module per other
subcommand (`train`, `eval`, `demo`, `export`).

May import: every layer; nothing imports it.
"""
