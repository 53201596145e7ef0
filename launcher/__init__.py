"""The launcher: submits, scales and accounts for agent job arrays; never processes files."""
