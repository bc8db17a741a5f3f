//! In-memory cluster (being written).
