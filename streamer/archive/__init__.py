"""IRSA over HTTP: naming, search, login, header-only reads, and the transfer of one file."""
