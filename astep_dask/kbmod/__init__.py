"""kbmod."""
