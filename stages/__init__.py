"""One module per pipeline stage; each is run by DVC as ``python -m stages.<name>``."""
