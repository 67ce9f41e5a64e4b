"""Pure model definitions and weight I/O (no FastAPI, no pydantic)."""
