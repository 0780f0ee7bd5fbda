//! Process output in a JSON stream: the standard base64 of the output between the proto3 JSON
//! names around it (`{"event":{"data":{"stdout":"` … `"}}}`), as one `bytes`.
//!
//! In Python that was `before + binascii.b2a_base64(b"".join(pieces)) + after`: a join, an encode
//! and a copy of the encoded text into the result, on the event loop, for every batch of output a
//! JSON client (the Python SDK) is sent. CPython's encoder is a byte-at-a-time loop: 605 MB/s on
//! this 2-core VM, over half of the agent's CPU for SDK pipe output (`perf`: 16 % of all samples of
//! a 256 MiB run, the agent 27.5 %). Here the pieces (the ring's chunks, uncopied) are encoded
//! straight into the result's own buffer by the `base64` crate, carrying the 1-2 bytes that do not
//! fill a 3-byte group from one piece into the next.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::chunk::OutputChunk;

/// Adds this module's functions to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(base64_between, m)?)?;
    Ok(())
}

/// Encoded length of `n` bytes, padding included.
fn encoded_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Encodes `pieces`, as if joined, into `out` (exactly [`encoded_len`] of their total).
fn encode_pieces(pieces: &[&[u8]], out: &mut [u8]) {
    let mut carry = [0u8; 3];
    let mut held = 0; // bytes in `carry`
    let mut at = 0; // bytes written to `out`
    for piece in pieces {
        let mut rest: &[u8] = piece;
        if held > 0 {
            let take = (3 - held).min(rest.len());
            carry[held..held + take].copy_from_slice(&rest[..take]);
            held += take;
            rest = &rest[take..];
            if held < 3 {
                continue;
            }
            at += STANDARD
                .encode_slice(carry, &mut out[at..])
                .expect("room for one group");
        }
        let whole = rest.len() - rest.len() % 3;
        if whole > 0 {
            at += STANDARD
                .encode_slice(&rest[..whole], &mut out[at..])
                .expect("room for the whole groups");
        }
        let tail = &rest[whole..];
        carry[..tail.len()].copy_from_slice(tail);
        held = tail.len();
    }
    if held > 0 {
        at += STANDARD
            .encode_slice(&carry[..held], &mut out[at..])
            .expect("room for the last group");
    }
    debug_assert_eq!(at, out.len());
}

/// `before + base64(data) + after` as one `bytes`, where `data` is a `bytes`, or a list or tuple
/// of `bytes` and `OutputChunk` that add up to the output (what `Subscriber.next_batch` gives).
#[pyfunction]
fn base64_between<'py>(
    py: Python<'py>,
    before: &[u8],
    data: &Bound<'py, PyAny>,
    after: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let items: Vec<Bound<'py, PyAny>> = if data.is_instance_of::<PyBytes>() {
        vec![data.clone()]
    } else if let Ok(list) = data.cast::<PyList>() {
        list.iter().collect()
    } else if let Ok(tuple) = data.cast::<PyTuple>() {
        tuple.iter().collect()
    } else {
        return Err(PyTypeError::new_err(
            "data must be bytes, or a list or tuple of bytes and OutputChunk",
        ));
    };
    let pieces: Vec<&[u8]> = items
        .iter()
        .map(|item| {
            if let Ok(bytes) = item.cast::<PyBytes>() {
                Ok(bytes.as_bytes())
            } else if let Ok(chunk) = item.cast::<OutputChunk>() {
                Ok(&chunk.get().0[..])
            } else {
                Err(PyTypeError::new_err(format!(
                    "data pieces must be bytes or OutputChunk, not {}",
                    item.get_type().name()?
                )))
            }
        })
        .collect::<PyResult<_>>()?;
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let size = before.len() + encoded_len(total) + after.len();
    PyBytes::new_with(py, size, |out| {
        out[..before.len()].copy_from_slice(before);
        let end = size - after.len();
        encode_pieces(&pieces, &mut out[before.len()..end]);
        out[end..].copy_from_slice(after);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(pieces: &[&[u8]]) -> String {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let mut out = vec![0u8; encoded_len(total)];
        encode_pieces(pieces, &mut out);
        String::from_utf8(out).expect("ascii")
    }

    #[test]
    fn pieces_of_every_split_encode_as_the_joined_bytes() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for size in [0, 1, 2, 3, 4, 5, 6, 7, 100, 1000] {
            let whole = STANDARD.encode(&data[..size]);
            assert_eq!(encoded(&[&data[..size]]), whole, "size {size}");
            for a in 0..=size.min(8) {
                for b in a..=size.min(9) {
                    let parts = [&data[..a], &data[a..b], &[][..], &data[b..size]];
                    assert_eq!(encoded(&parts), whole, "size {size}, splits {a} {b}");
                }
            }
        }
    }

    #[test]
    fn one_byte_pieces_carry_across_several_pieces() {
        let data = b"sandboxd!";
        let parts: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(encoded(&parts), STANDARD.encode(data));
    }
}
