"""`make bench`: tts-streamer measured at a receiver in another process, on loopback (see bench/run.py)."""
