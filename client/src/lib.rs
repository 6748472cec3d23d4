//! GenOS stream client library and genos-view.
