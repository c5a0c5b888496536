"""The vocabulary: event types, the stream-entry codec, stream and group names, `as_str`.
Imports nothing else of the project."""
