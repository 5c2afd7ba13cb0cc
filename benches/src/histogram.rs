//! A latency histogram with bounded relative error and no allocation per sample, shared by
//! every load tool (NVMe perf, the vhost-user load generator).

/// Latency histogram: 64 power-of-two ranges of nanoseconds, each split in 16 linear buckets.
#[derive(Clone)]
pub struct Histogram {
    buckets: [u64; 64 * 16],
    count: u64,
    sum_ns: u128,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: [0; 64 * 16],
            count: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl Histogram {
    fn index(ns: u64) -> usize {
        if ns < 16 {
            return ns as usize;
        }
        let msb = 63 - ns.leading_zeros() as usize; // >= 4
        let sub = ((ns >> (msb - 4)) & 15) as usize;
        (msb - 3) * 16 + sub
    }

    fn upper_bound(index: usize) -> u64 {
        if index < 16 {
            return index as u64;
        }
        let msb = index / 16 + 3;
        let sub = (index % 16) as u64;
        let bound = ((16 + u128::from(sub) + 1) << (msb - 4)) - 1;
        bound.min(u128::from(u64::MAX)) as u64
    }

    /// Records one latency.
    pub fn record(&mut self, ns: u64) {
        self.buckets[Self::index(ns)] += 1;
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds another histogram.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// The longest latency recorded, exactly (not a bucket bound).
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean in nanoseconds.
    pub fn mean_ns(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count as f64
        }
    }

    /// The distribution: for each bucket that holds samples, its upper bound in nanoseconds
    /// and the fraction of samples at or below it (ends at 1.0).
    pub fn cdf(&self) -> Vec<(u64, f64)> {
        let mut seen = 0;
        let mut out = Vec::new();
        for (i, &n) in self.buckets.iter().enumerate() {
            if n > 0 {
                seen += n;
                out.push((Self::upper_bound(i), seen as f64 / self.count as f64));
            }
        }
        out
    }

    /// The latency at quantile `q` (0..1), as the upper bound of its bucket (within 1/16).
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Self::upper_bound(i);
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_within_a_sixteenth() {
        let mut h = Histogram::default();
        for ns in 1..=100_000u64 {
            h.record(ns);
        }
        for (q, exact) in [(0.5, 50_000.0), (0.99, 99_000.0), (0.999, 99_900.0)] {
            let got = h.quantile_ns(q) as f64;
            assert!(
                got >= exact && got <= exact * (1.0 + 1.0 / 16.0),
                "q{q}: {got} vs {exact}"
            );
        }
        assert!((h.mean_ns() - 50_000.5).abs() < 1.0);
        assert_eq!(h.max_ns(), 100_000);
        let mut other = Histogram::default();
        other.record(123_457);
        h.merge(&other);
        assert_eq!(h.max_ns(), 123_457);
        let cdf = h.cdf();
        assert_eq!(cdf.last().unwrap().1, 1.0);
        assert!(cdf.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
        assert!(cdf.last().unwrap().0 >= 123_457);
        // Every value falls in a bucket whose upper bound is at least the value.
        for ns in [0u64, 15, 16, 17, 31, 32, 1000, 1 << 40, u64::MAX] {
            let i = Histogram::index(ns);
            assert!(Histogram::upper_bound(i) >= ns, "{ns}");
            if i > 0 {
                assert!(Histogram::upper_bound(i - 1) < ns, "{ns}");
            }
        }
    }
}
