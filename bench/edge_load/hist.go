package main

import (
	"math"
	"math/bits"
	"sync/atomic"
	"time"
)

// histogram of latencies in microseconds, log-linear like HDR: exact below
// 2048 µs, then 1024 buckets per power of two (under 0.1% error), up to 2^40 µs.
// Safe for concurrent use.
type histogram struct {
	counts [(maxShift + 2) * subBuckets]atomic.Int64
	max    atomic.Int64
}

const (
	subBits    = 10
	subBuckets = 1 << subBits
	maxShift   = 40 - subBits - 1
)

func bucket(us uint64) int {
	if us < 2*subBuckets {
		return int(us)
	}
	shift := min(bits.Len64(us)-subBits-1, maxShift)
	us = min(us>>shift, 2*subBuckets-1)
	return (shift+1)*subBuckets + int(us) - subBuckets
}

// upper is the highest value that falls in bucket i.
func upper(i int) uint64 {
	if i < 2*subBuckets {
		return uint64(i)
	}
	shift := i/subBuckets - 1
	return uint64(i-shift*subBuckets+1)<<shift - 1
}

func (h *histogram) record(d time.Duration) {
	us := max(d.Microseconds(), 0)
	h.counts[bucket(uint64(us))].Add(1)
	for m := h.max.Load(); us > m && !h.max.CompareAndSwap(m, us); m = h.max.Load() {
	}
}

// quantileMs is the q-quantile in milliseconds (the bucket's upper bound, at most the max).
func (h *histogram) quantileMs(q float64) float64 {
	var total int64
	for i := range h.counts {
		total += h.counts[i].Load()
	}
	if total == 0 {
		return 0
	}
	rank := int64(math.Ceil(q * float64(total)))
	var seen int64
	for i := range h.counts {
		if seen += h.counts[i].Load(); seen >= max(rank, 1) {
			return round(float64(min(upper(i), uint64(h.max.Load())))/1000, 3)
		}
	}
	return round(float64(h.max.Load())/1000, 3)
}
