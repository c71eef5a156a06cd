//! Shared by the examples: nothing yet beyond the examples themselves.
