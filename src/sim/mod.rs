//! Deterministic simulation (SIMULATION.md).
pub mod disk;
