"""Training: a session's set-up (session.py), the one step loop (loop.py), the events it emits and the stop
requests it honours (events.py, interrupts.py), and `tunesmith bench` (bench.py)."""
