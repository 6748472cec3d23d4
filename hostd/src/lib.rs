//! GenOS host daemon and operator CLI.
