"""The worker's agents, one class each: `start()` takes what the agent needs (its pool, its
clients), `run(stream)` consumes its topic until the stream ends or is cancelled, `stop()` lets go
of it all. `processors.app` registers them with Faust."""
