//! Environment spec: the validated description of one GenOS environment.
