"""The package version, in one place (hatch reads it from here for the distribution)."""

__version__ = "0.1.0"
USER_AGENT = f"mantis-llm/{__version__} (httpx; python)"
