"""The web page for microscopists (``emassist web``): FastAPI app, model backends and the static page."""
