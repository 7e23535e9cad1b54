"""The `puregen-fast` command line: `main` wires up one module per subcommand."""
