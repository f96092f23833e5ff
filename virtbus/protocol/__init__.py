"""The wire protocol: envelope, codec, op names, event names. Pure data, no I/O."""
