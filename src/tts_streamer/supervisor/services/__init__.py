"""The voipbin services: command plane, streamings, speakings, speeches."""
