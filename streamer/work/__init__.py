"""Worker functions: load files, call the numerics, write products atomically, return small records."""
