"""Fault tests: real servers and processes, with faults injected between them and the client."""
