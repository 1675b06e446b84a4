"""The simulated IRSA archive: a generator of ZTF nights with known truth, and an HTTP server for them.

``generate`` writes a night in IRSA's layout (see its module docstring for the truth conventions);
``server`` serves such a directory with IRSA's search and data API, with faults on demand.
This package imports only ``streamer.storage.naming`` and the shared numerics of ``streamer.detrend``.
"""
