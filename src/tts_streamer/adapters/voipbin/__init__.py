"""voipbin AMQP wire layer (sans-IO): envelopes, models and the route table of Go tts-manager.

Everything here is pure parsing and rendering, byte-compatible with Go's ``encoding/json`` output; the
AMQP transport lives elsewhere. Input is parsed once at the edge into frozen attrs models, and every
malformed input surfaces as :class:`~tts_streamer.adapters.voipbin.wire.WireError`.
"""
