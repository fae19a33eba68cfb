//! The project as plain data: silt.toml, the sources and their contracts, test and model
//! specs, every mode an enum. Loading and checking them is all it does; it must not read the
//! lake nor run anything.

pub mod config;
pub mod contract;
