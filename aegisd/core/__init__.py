"""The AegisLink protocol core: pure, synchronous, no I/O.

Nothing in this package opens a socket or file, touches a database or event loop, or reads the
wall clock. Randomness comes from an injected `Entropy`; time comes in as an argument.
"""
