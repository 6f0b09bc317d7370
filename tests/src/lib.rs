//! Shared fixtures for the workspace integration tests.
