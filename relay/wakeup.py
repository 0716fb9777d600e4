"""How a worker's socket callbacks take what waits (relay/worker.py, relay/return_path.py)."""

MAX_BATCHES_PER_WAKEUP = 16  # then yield to the other sockets
# A socket's callback this soon after the last one returned: the loop came straight back,
# datagrams were waiting (one round of the loop takes ~3 µs): read them in batches.
BACK_TO_BACK_S = 20e-6
