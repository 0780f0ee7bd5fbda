"""The runtime: ``sandboxd serve`` creates isolated sandboxes and serves E2B's control-plane API."""
