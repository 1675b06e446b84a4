"""ztf-streamer: stream ZTF data from IRSA, detrend it to aperture catalogues, within a disk budget."""

__version__ = "0.1.0"
