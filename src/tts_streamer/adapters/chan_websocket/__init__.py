"""Asterisk chan_websocket (INCOMING mode): sans-IO protocol and the Trio client shell."""
