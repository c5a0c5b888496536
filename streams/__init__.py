"""Redis Streams machinery: keys, group reading, pending entries, dead letters, paging, the client.

Knows nothing of what CJ or LPS events mean; imports nothing of the project but `events`.
"""
