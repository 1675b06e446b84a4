"""Readers and writers of the files the workers touch: raw frames, masters, aperture catalogues, the reference catalogue."""
