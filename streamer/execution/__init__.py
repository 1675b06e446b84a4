"""Where the work functions run: the executor interface, the local pool, dask, and the job kinds."""
