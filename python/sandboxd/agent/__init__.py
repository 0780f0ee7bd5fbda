"""The agent: an envd-compatible daemon that runs inside each sandbox."""
