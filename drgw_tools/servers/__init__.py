"""Private brokers for tests, benchmarks and rehearsals: a nats-server, MQTT listeners."""
