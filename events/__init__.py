"""Event types, the stream-entry codec and stream names. Imports nothing else of the project."""
