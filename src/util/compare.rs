//! Numeric comparisons that fail on NaN and infinity.
//!
//! `fold(0.0, f32::max)` skips a NaN (`max` returns the other operand), so a check built on it
//! passes when the values compared are garbage. These return +∞ instead: every
//! `diff <= tolerance` fails on a NaN or an infinity on either side, or on lengths that differ.

use candle_core::{DType, Tensor};

/// Largest |x| over `v`; +∞ when any value is NaN or infinite.
pub fn max_abs<T: Copy + Into<f64>>(v: &[T]) -> f64 {
    let mut m = 0f64;
    for &x in v {
        let x: f64 = x.into();
        if !x.is_finite() {
            return f64::INFINITY;
        }
        m = m.max(x.abs());
    }
    m
}

/// Largest |a[i] − b[i]|; +∞ when the lengths differ or either side holds a NaN or an infinity.
pub fn max_abs_diff<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let mut m = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        let (x, y): (f64, f64) = (x.into(), y.into());
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        m = m.max((x - y).abs());
    }
    m
}

/// [`max_abs_diff`] relative to the largest |reference| (`reference` is the first argument),
/// with `floor` as the smallest scale (so all-zero references do not divide by zero).
pub fn max_rel_diff<A: Copy + Into<f64>, B: Copy + Into<f64>>(reference: &[A], got: &[B], floor: f64) -> f64 {
    max_abs_diff(reference, got) / max_abs(reference).max(floor)
}

/// A tensor's values as f64 on the host, in row-major order.
fn host_f64(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// [`max_abs_diff`] of two tensors (any dtype or device); +∞ when their shapes differ.
pub fn tensor_max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    if a.dims() != b.dims() {
        return Ok(f64::INFINITY);
    }
    Ok(max_abs_diff(&host_f64(a)?, &host_f64(b)?))
}

/// [`max_rel_diff`] of two tensors (any dtype or device); +∞ when their shapes differ.
pub fn tensor_max_rel_diff(reference: &Tensor, got: &Tensor, floor: f64) -> candle_core::Result<f64> {
    if reference.dims() != got.dims() {
        return Ok(f64::INFINITY);
    }
    Ok(max_rel_diff(&host_f64(reference)?, &host_f64(got)?, floor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_and_infinity_fail_every_tolerance() {
        let good = [1.0f32, 2.0, 3.0];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let other = [1.0f32, bad, 3.0];
            // Every tolerance check fails: the result is +∞, above any bound.
            assert_eq!(max_abs_diff(&good, &other), f64::INFINITY, "{bad} passed");
            assert_eq!(max_abs_diff(&other, &good), f64::INFINITY, "{bad} passed as reference");
            assert_eq!(max_rel_diff(&good, &other, 1.0), f64::INFINITY);
            assert_eq!(max_abs(&other), f64::INFINITY);
        }
        // What the helpers replace: the fold skips the NaN and reports a perfect match.
        let nan = [1.0f32, f32::NAN, 3.0];
        let folded = good.iter().zip(&nan).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert_eq!(folded, 0.0);
    }

    #[test]
    fn lengths_must_match_and_values_are_measured() {
        assert_eq!(max_abs_diff(&[1.0f32, 2.0], &[1.0f32]), f64::INFINITY);
        assert_eq!(max_abs_diff(&[1.0f32, 2.0], &[1.5f64, 2.0]), 0.5);
        assert_eq!(max_rel_diff(&[4.0f32, -8.0], &[4.0f32, -7.0], 1.0), 0.125);
        assert_eq!(max_rel_diff(&[0.0f32], &[0.0f32], 1e-6), 0.0);
        assert_eq!(max_abs::<f32>(&[]), 0.0);
    }

    #[test]
    fn tensors_compare_the_same_way() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let b = Tensor::new(&[[1.0f32, 2.5], [3.0, 4.0]], &dev).unwrap();
        let nan = Tensor::new(&[[1.0f32, f32::NAN], [3.0, 4.0]], &dev).unwrap();
        assert_eq!(tensor_max_abs_diff(&a, &b).unwrap(), 0.5);
        assert_eq!(tensor_max_rel_diff(&a, &b, 1.0).unwrap(), 0.125);
        assert_eq!(tensor_max_abs_diff(&a, &nan).unwrap(), f64::INFINITY);
        assert_eq!(tensor_max_abs_diff(&a, &a.flatten_all().unwrap()).unwrap(), f64::INFINITY);
    }
}
