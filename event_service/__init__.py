"""The event service: playback events in, fresh user vectors out, nothing lost."""
