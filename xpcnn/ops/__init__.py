"""The backend-specific kernels that replace a few of :mod:`xpcnn.functional`'s reference operations."""
