"""Voice and video calls (docs/protocol.md §21, docs/api.md "Calls").

- signaling.py: pure and typed: the per-call keys and the sealed signaling messages.
- service.py: the call state machine, timeouts, history, events (no aiortc import).
- engine.py: everything aiortc; imported only when a call starts (an idle daemon does not pay
  for it in memory or start-up time).
"""
