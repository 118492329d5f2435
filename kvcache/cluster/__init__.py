"""Cache daemons working together as a cluster (discovery, messages, index, sync)."""
