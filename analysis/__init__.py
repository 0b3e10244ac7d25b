"""Analysis of run records and saved weights. Reads records and weights only, never the runner's internals."""
