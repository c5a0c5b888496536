"""The application layer: what the CLI (and later a web dashboard) calls. No click here."""
