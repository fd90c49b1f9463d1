"""The `minisora` command line (typer)."""
