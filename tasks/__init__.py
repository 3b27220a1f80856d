"""Task entry points, one module per concern.  Each task validates its JSON arguments,
calls a plain function from ``worker`` with explicit connections, and returns JSON."""
