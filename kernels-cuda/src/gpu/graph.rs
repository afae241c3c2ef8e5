//! CUDA graphs of a cached (decode) step.
//!
//! A decode step is a dozen small launches and copies per device around one attention
//! kernel. Enqueued one by one, their host cost (tens of microseconds per device, cuBLAS's
//! most of all) is on the step's critical path, and on several devices it adds up, because
//! one thread enqueues every device's work. Captured once per device and replayed with one
//! launch, the step costs the host a few microseconds per device. A captured step is valid
//! while everything its launches read from the host side stays the same: launch shapes,
//! kernels and buffer addresses (the step's key); the buffers' contents (metadata, x) are
//! rewritten before every replay.

use cust::sys as cu;

use super::drv;
use crate::error::Result;

/// One device's instantiated graph, destroyed on drop.
pub(super) struct Exec(cu::CUgraphExec);

impl Exec {
    /// Ends the capture on `stream` and instantiates what it recorded.
    ///
    /// # Safety
    /// `stream` is capturing, in the current context.
    pub(super) unsafe fn end_capture(stream: cu::CUstream) -> Result<Exec> {
        let mut graph: cu::CUgraph = std::ptr::null_mut();
        // SAFETY: per this function's contract; valid out-pointer.
        drv("cuStreamEndCapture", unsafe {
            cu::cuStreamEndCapture(stream, &mut graph)
        })?;
        let mut exec: cu::CUgraphExec = std::ptr::null_mut();
        // SAFETY: `graph` was just captured; valid out-pointer; no flags.
        let made = drv("cuGraphInstantiateWithFlags", unsafe {
            cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0)
        });
        // SAFETY: the graph is not needed once instantiated (or failed to be).
        unsafe {
            cu::cuGraphDestroy(graph);
        }
        made.map(|()| Exec(exec))
    }

    /// Uploads the graph's device resources on `stream` ahead of its first launch.
    ///
    /// # Safety
    /// As [`Exec::launch`].
    pub(super) unsafe fn upload(&self, stream: cu::CUstream) -> Result<()> {
        // SAFETY: per this function's contract.
        drv("cuGraphUpload", unsafe {
            cu::cuGraphUpload(self.0, stream)
        })
    }

    /// Replays the graph on `stream`.
    ///
    /// # Safety
    /// `stream` belongs to the context the graph was captured in, which is current; every
    /// buffer the graph touches is alive and holds this step's contents.
    pub(super) unsafe fn launch(&self, stream: cu::CUstream) -> Result<()> {
        // SAFETY: per this function's contract.
        drv("cuGraphLaunch", unsafe {
            cu::cuGraphLaunch(self.0, stream)
        })
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        // SAFETY: instantiated once, destroyed once; its owner waits for its launches first.
        unsafe {
            cu::cuGraphExecDestroy(self.0);
        }
    }
}

/// Starts capturing `stream` (relaxed mode: the step's own host calls, such as cuBLAS's,
/// stay legal meanwhile).
///
/// # Safety
/// `stream` belongs to the current context and is not capturing.
pub(super) unsafe fn begin_capture(stream: cu::CUstream) -> Result<()> {
    // SAFETY: per this function's contract.
    drv("cuStreamBeginCapture", unsafe {
        cu::cuStreamBeginCapture_v2(
            stream,
            cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
        )
    })
}

/// Ends a capture on `stream` that failed part way, discarding what it recorded.
///
/// # Safety
/// `stream` belongs to the current context.
pub(super) unsafe fn abandon_capture(stream: cu::CUstream) {
    let mut graph: cu::CUgraph = std::ptr::null_mut();
    // SAFETY: per this function's contract; valid out-pointer. A stream that is not capturing
    // (any more) returns an error, ignored: there is nothing to discard then.
    unsafe {
        if cu::cuStreamEndCapture(stream, &mut graph) == cu::CUresult::CUDA_SUCCESS
            && !graph.is_null()
        {
            cu::cuGraphDestroy(graph);
        }
    }
}

/// Every device's captured step and the key it was captured for.
pub(super) struct StepGraphs {
    pub(super) key: Vec<u64>,
    pub(super) execs: Vec<Exec>,
}
