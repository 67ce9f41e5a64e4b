"""Lamina's server: the generation engine (`server.engine`) and the HTTP API (`server.api`)."""
