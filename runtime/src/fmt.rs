//! Internal log macros: routed to `defmt` with the `defmt` feature, to nothing otherwise, so the
//! core code never mentions a logging framework.

#[cfg(feature = "defmt")]
macro_rules! info {
    ($($arg:tt)*) => { defmt::info!($($arg)*) };
}

#[cfg(not(feature = "defmt"))]
macro_rules! info {
    ($($arg:tt)*) => {{
        // Type-check the arguments without evaluating them at run time.
        if false {
            let _ = ($($arg)*);
        }
    }};
}

pub(crate) use info;
