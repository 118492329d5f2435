"""Where replicas live: Kubernetes, local processes, memory (``base.Actuator``)."""
