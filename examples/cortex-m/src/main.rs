//! attnrt on a Cortex-M4F (QEMU `mps2-an386`): one attention layer with GQA, RoPE, per-head
//! QK-norm, a sliding window and two packed documents, run from weights in flash and a static
//! workspace, with no heap.
//!
//! Prints over semihosting the backend, the arena sizes, the cycle count of the forward call,
//! the peak stack (stack painting), a checksum and every output value, then exits QEMU with
//! status 0. `tests/tests/embedded_firmware.rs` runs it and compares the values with the same
//! layer on the host.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::{DWT, SYST};
use cortex_m_rt::{entry, exception};
use cortex_m_semihosting::{debug, hprintln};
#[cfg(feature = "defmt")]
use defmt_semihosting as _;
use panic_semihosting as _;

#[allow(dead_code)]
#[path = "../layer/layer.rs"]
mod layer;

use layer::{gen, OUT_LEN, ROPE_TABLE_LEN, WORKSPACE_LEN};

/// Bytes aligned to 4, so that the blob can be viewed as bf16 and f32 in place.
#[repr(C, align(4))]
struct Aligned<B: ?Sized>(B);

/// The weights (bf16) and the input x (f32), written by `build.rs`; in flash (`.rodata`).
static BLOB: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/layer.bin")));

/// A static buffer handed out once as `&'static mut`: the arena pattern of this firmware.
///
/// Unlike `cortex_m::singleton!`, the initial value is a `const`, so a zeroed buffer lives in
/// `.bss` and is never built on the stack (which would spoil the stack measurement).
struct Once<T> {
    taken: AtomicBool,
    data: UnsafeCell<T>,
}

// SAFETY: the data is reachable only through `take`, which hands out at most one reference,
// so sharing the `Once` between contexts never shares the data.
unsafe impl<T: Send> Sync for Once<T> {}

impl<T> Once<T> {
    const fn new(value: T) -> Self {
        Once {
            taken: AtomicBool::new(false),
            data: UnsafeCell::new(value),
        }
    }

    /// The buffer, the first time; `None` ever after.
    // `&self` to `&mut T` is sound here: the atomic flag makes the mutable borrow unique.
    #[allow(clippy::mut_from_ref)]
    fn take(&'static self) -> Option<&'static mut T> {
        if self.taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        // SAFETY: `taken` was false and is now true, atomically: this is the only call that
        // gets here, so this is the only reference to the data, for the rest of the program.
        Some(unsafe { &mut *self.data.get() })
    }
}

/// The runtime's workspace, sized by its `const fn` for T = 16.
static WORKSPACE: Once<[f32; WORKSPACE_LEN]> = Once::new([0.0; WORKSPACE_LEN]);
/// The rotary cos/sin table, built at start.
static ROPE_TABLE: Once<[f32; ROPE_TABLE_LEN]> = Once::new([0.0; ROPE_TABLE_LEN]);
/// The output y.
static OUT: Once<[f32; OUT_LEN]> = Once::new([0.0; OUT_LEN]);

/// SysTick wraps (of 2^24 ticks each) since the counter started.
static SYSTICK_WRAPS: AtomicU32 = AtomicU32::new(0);
const SYSTICK_RELOAD: u32 = 0x00FF_FFFF;

#[exception]
fn SysTick() {
    SYSTICK_WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// Ticks since `start_systick`, counting wraps.
fn systick_ticks() -> u64 {
    loop {
        let wraps = SYSTICK_WRAPS.load(Ordering::Relaxed);
        let current = SYST::get_current();
        if SYSTICK_WRAPS.load(Ordering::Relaxed) == wraps {
            return u64::from(wraps) * (u64::from(SYSTICK_RELOAD) + 1)
                + u64::from(SYSTICK_RELOAD - current);
        }
    }
}

/// Bytes below the stack pointer that stack painting leaves alone.
const STACK_MARGIN: usize = 64;

/// The word that stack painting fills the unused stack with.
const PAINT: u32 = 0xC0DE_57AC;

extern "C" {
    /// Top of the stack (highest address, exclusive), from cortex-m-rt's `link.x`.
    static _stack_start: u32;
    /// Bottom of the stack region (the end of `.bss`/`.uninit`), from cortex-m-rt's `link.x`.
    static _stack_end: u32;
}

fn stack_bounds() -> (usize, usize) {
    // Only the addresses of the linker symbols are taken, never their contents.
    let top = core::ptr::addr_of!(_stack_start) as usize;
    let bottom = core::ptr::addr_of!(_stack_end) as usize;
    (bottom, top)
}

/// Fills the stack region from its bottom up to 64 bytes below the current stack pointer with
/// [`PAINT`]; returns the stack depth in bytes at the call.
///
/// The margin matters: the compiler may read `sp` before this function's prologue pushes its
/// registers (it did), so the words just below the value read can be live. Any callee of the
/// caller that needs more than 64 bytes of stack is measured exactly.
#[inline(never)]
fn paint_stack() -> usize {
    let (bottom, top) = stack_bounds();
    let sp = cortex_m::register::msp::read() as usize;
    let limit = sp - STACK_MARGIN;
    let mut p = bottom;
    while p < limit {
        // SAFETY: `bottom..limit` is free stack of cortex-m-rt's RAM layout: everything live
        // (this function's pushed registers included) lies within `STACK_MARGIN` bytes below
        // `sp` or above it, nothing else (no heap, no static) is placed between `_stack_end`
        // and the stack, and an exception taken meanwhile pops its frame before we go on.
        unsafe { (p as *mut u32).write_volatile(PAINT) };
        p += 4;
    }
    top - sp
}

/// The deepest the stack has gone since [`paint_stack`]: bytes from the top to the lowest word
/// that no longer holds the paint.
fn stack_high_water() -> usize {
    let (bottom, top) = stack_bounds();
    let mut p = bottom;
    // SAFETY: `p` stays inside the stack region `bottom..top`, word aligned (cortex-m-rt
    // asserts both ends are multiples of 4); reading RAM has no side effects.
    while p < top && unsafe { (p as *const u32).read_volatile() } == PAINT {
        p += 4;
    }
    top - p
}

/// Runs `f` (the forward call) between two reads of both counters, out of line so that the
/// stack it needs shows below `main`'s frame. Returns its result, DWT cycles and SysTick ticks.
#[inline(never)]
fn timed<R>(f: impl FnOnce() -> R) -> (R, u32, u64) {
    let (d0, t0) = (DWT::cycle_count(), systick_ticks());
    let r = f();
    let (d1, t1) = (DWT::cycle_count(), systick_ticks());
    (r, d1.wrapping_sub(d0), t1 - t0)
}

fn fail(what: &str, err: attnrt::Error) -> ! {
    hprintln!("error: {}: {}", what, err);
    debug::exit(debug::EXIT_FAILURE);
    #[allow(clippy::empty_loop)]
    loop {}
}

#[entry]
fn main() -> ! {
    let mut cp = cortex_m::Peripherals::take().expect("peripherals taken once");
    let ws = WORKSPACE.take().expect("workspace taken once");
    let table_buf = ROPE_TABLE.take().expect("rope table taken once");
    let y = OUT.take().expect("output taken once");

    hprintln!("attnrt cortex-m4f demo (qemu mps2-an386)");
    hprintln!(
        "layer: n_embd {} heads {} kv_heads {} head_dim {} window {} T {} docs 2 (7+9 tokens) rope interleaved theta {} qk_norm per-head weights bf16",
        gen::N_EMBD,
        gen::N_HEAD,
        gen::N_KV_HEAD,
        gen::HEAD_DIM,
        gen::WINDOW,
        gen::T,
        gen::ROPE_THETA
    );
    hprintln!(
        "arena: workspace {} f32 = {} bytes; rope table {} f32 = {} bytes; output {} f32 = {} bytes",
        WORKSPACE_LEN,
        WORKSPACE_LEN * 4,
        ROPE_TABLE_LEN,
        ROPE_TABLE_LEN * 4,
        OUT_LEN,
        OUT_LEN * 4
    );
    #[cfg(feature = "defmt")]
    defmt::info!("arena: workspace {=usize} f32", WORKSPACE_LEN);

    let blob = &BLOB.0;
    let x = layer::x(blob).unwrap_or_else(|e| fail("x", e));

    // Cycle counters: the DWT's, and SysTick on the core clock as the fallback.
    cp.DCB.enable_trace();
    cp.DWT.enable_cycle_counter();
    cp.SYST.set_clock_source(SystClkSource::Core);
    cp.SYST.set_reload(SYSTICK_RELOAD);
    cp.SYST.clear_current();
    cp.SYST.enable_interrupt();
    cp.SYST.enable_counter();

    #[cfg(not(feature = "no-runtime"))]
    let (backend, dwt, ticks, depth_at_call) = {
        let table = layer::rope_table(table_buf).unwrap_or_else(|e| fail("rope table", e));
        let weights = layer::weights(blob).unwrap_or_else(|e| fail("weights", e));
        let l = attnrt::Layer::new(layer::CFG, weights).unwrap_or_else(|e| fail("layer", e));
        let inputs = layer::inputs(x, table);

        let depth_at_call = paint_stack();
        let (backend, dwt, ticks) = timed(|| l.forward_reference(&inputs, ws, y));
        let backend = backend.unwrap_or_else(|e| fail("forward", e));
        (backend, dwt, ticks, depth_at_call)
    };
    #[cfg(feature = "no-runtime")]
    let (backend, dwt, ticks, depth_at_call) = {
        // Baseline for the footprint: everything but the runtime's forward call.
        let _ = (ws, table_buf);
        let depth_at_call = paint_stack();
        let ((), dwt, ticks) = timed(|| y.copy_from_slice(x));
        ("none (no-runtime build)", dwt, ticks, depth_at_call)
    };
    let peak = stack_high_water();

    hprintln!("backend: {}", backend);
    if dwt != 0 {
        hprintln!("cycles: {} (DWT CYCCNT)", dwt);
    } else {
        hprintln!("cycles: DWT CYCCNT reads 0 here (QEMU does not model it)");
    }
    hprintln!(
        "systick: {} ticks of the 25 MHz core clock (QEMU: emulated time; with -icount shift=0, 1 tick = 40 instructions, so ~{} instructions)",
        ticks,
        ticks * 40
    );
    hprintln!(
        "stack: {} bytes peak (painted), {} bytes in use at the call, {} bytes by the forward call",
        peak,
        depth_at_call,
        peak.saturating_sub(depth_at_call)
    );
    let (sum, abs) = layer::checksum(y);
    hprintln!("checksum: sum {:e} abs {:e}", sum, abs);
    hprintln!("first4: {:e} {:e} {:e} {:e}", y[0], y[1], y[2], y[3]);
    for (i, row) in y.chunks(8).enumerate() {
        hprintln!(
            "y[{}]: {:e} {:e} {:e} {:e} {:e} {:e} {:e} {:e}",
            i * 8,
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7]
        );
    }
    hprintln!("done");
    debug::exit(debug::EXIT_SUCCESS);
    #[allow(clippy::empty_loop)]
    loop {}
}
