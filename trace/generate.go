package trace

import (
	"fmt"
	"math"
	"math/rand/v2"
)

// SpikeConfig shapes a generated spiky function.
type SpikeConfig struct {
	Minutes    int     // trace length in minutes (default 45)
	BaseRate   float64 // mean invocations per minute outside spikes (Poisson; 0 is idle)
	Spikes     int     // number of spike minutes (default 3)
	SpikeSize  int     // invocations in a spike minute (default 100)
	FirstSpike int     // minute (from 0) of the first spike (default 3)
	Gap        int     // minutes between spikes (default 15)
	Seed       int64   // random seed of the base-rate counts
}

func (c *SpikeConfig) defaults() {
	if c.Minutes <= 0 {
		c.Minutes = 45
	}
	if c.Spikes <= 0 {
		c.Spikes = 3
	}
	if c.SpikeSize <= 0 {
		c.SpikeSize = 100
	}
	if c.FirstSpike <= 0 {
		c.FirstSpike = 3
	}
	if c.Gap <= 0 {
		c.Gap = 15
	}
	if c.BaseRate < 0 {
		c.BaseRate = 0
	}
}

// GenerateSpiky returns a synthetic HTTP-triggered function: Poisson
// counts at BaseRate per minute, and Spikes minutes, Gap apart from
// FirstSpike, of SpikeSize invocations each (spikes past the end are
// dropped). The same config always yields the same function.
func GenerateSpiky(c SpikeConfig) Function {
	c.defaults()
	rng := rand.New(rand.NewPCG(uint64(c.Seed), 0x6d69746f736973))
	f := Function{
		Owner:    hash(rng),
		App:      hash(rng),
		Function: hash(rng),
		Trigger:  "http",
		Counts:   make([]int, c.Minutes),
	}
	for i := range f.Counts {
		f.Counts[i] = poisson(rng, c.BaseRate)
	}
	for k := 0; k < c.Spikes; k++ {
		m := c.FirstSpike + k*c.Gap
		if m >= c.Minutes {
			break
		}
		f.Counts[m] = c.SpikeSize
	}
	return f
}

// hash returns a 64-hex-digit name like the dataset's anonymized hashes.
func hash(rng *rand.Rand) string {
	return fmt.Sprintf("%016x%016x%016x%016x", rng.Uint64(), rng.Uint64(), rng.Uint64(), rng.Uint64())
}

// poisson draws from Poisson(mean) (Knuth's method below 30, a rounded
// normal approximation above).
func poisson(rng *rand.Rand, mean float64) int {
	if mean <= 0 {
		return 0
	}
	if mean > 30 {
		return max(0, int(math.Round(mean+math.Sqrt(mean)*rng.NormFloat64())))
	}
	l, k, p := math.Exp(-mean), 0, 1.0
	for {
		p *= rng.Float64()
		if p <= l {
			return k
		}
		k++
	}
}
