"""Transport-agnostic services: each takes request messages and returns messages or streams."""
