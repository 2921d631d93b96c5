"""Serving glue shared by every service: bootstrap (health, reflection, metrics, auth, TLS, graceful
shutdown), error mapping, tensor codecs and logging."""
