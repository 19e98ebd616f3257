package lbmap

import (
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"

	"github.com/kpfree/kpfree/bpf"
)

// MaglevTable fills a Maglev lookup table of m slots (Eisenbud et al.,
// "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016,
// section 3.4) for the backends named by keys, and returns for each slot the
// index into keys of the backend it holds.
//
// Each backend's preference list is the permutation offset + j*skip (mod m)
// with offset and skip from two hashes of its key alone, and backends take
// turns in the order of their keys, so the table depends only on the set of
// keys: every node computes the same table for the same backends whatever
// their order or local ids. Backends take one slot per turn, so their slot
// counts differ by at most one; removing a backend moves few slots besides
// its own.
//
// m must be prime (so every skip walks all slots). A repeated key counts
// once (its first index); no keys gives a nil table; with more backends than
// slots, the last ones in key order get none.
func MaglevTable(keys []string, m int) ([]int, error) {
	if !isPrime(m) {
		return nil, fmt.Errorf("lbmap: Maglev table size %d is not a prime", m)
	}
	type perm struct {
		key          string
		index        int
		offset, skip uint64
		next         uint64
	}
	var ps []*perm
	seen := map[string]bool{}
	for i, k := range keys {
		if seen[k] {
			continue
		}
		seen[k] = true
		ps = append(ps, &perm{
			key: k, index: i,
			offset: hashKey(0, k) % uint64(m),
			skip:   hashKey(1, k)%uint64(m-1) + 1,
		})
	}
	if len(ps) == 0 {
		return nil, nil
	}
	slices.SortFunc(ps, func(a, b *perm) int {
		switch {
		case a.key < b.key:
			return -1
		case a.key > b.key:
			return 1
		}
		return 0
	})
	table := make([]int, m)
	for i := range table {
		table[i] = -1
	}
	filled := 0
	for {
		for _, p := range ps {
			c := (p.offset + p.next*p.skip) % uint64(m)
			for table[c] >= 0 {
				p.next++
				c = (p.offset + p.next*p.skip) % uint64(m)
			}
			table[c] = p.index
			p.next++
			filled++
			if filled == m {
				return table, nil
			}
		}
	}
}

// hashKey is FNV-1a 64 of a seed byte and the key, finished with the
// MurmurHash3 mixer so that similar keys ("10.0.0.1:80", "10.0.0.2:80")
// spread over all bits. Stable across processes and machines.
func hashKey(seed byte, key string) uint64 {
	h := fnv.New64a()
	h.Write([]byte{seed})
	h.Write([]byte(key))
	x := h.Sum64()
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

func isPrime(n int) bool {
	if n < 2 {
		return false
	}
	for d := 2; d*d <= n; d++ {
		if n%d == 0 {
			return false
		}
	}
	return true
}

// MaglevKey is the stable name of a backend in Maglev hashing: "addr:port"
// (Local and the per-node backend id play no part).
func MaglevKey(b Backend) string { return netip.AddrPortFrom(b.Addr.Unmap(), b.Port).String() }

// maglevIDs is the kpf_maglev table of a Service whose slot i holds backend
// backends[i] with id ids[i]; nil without backends.
func maglevIDs(backends []Backend, ids []uint32) []uint32 {
	keys := make([]string, len(backends))
	for i, b := range backends {
		keys[i] = MaglevKey(b)
	}
	idx, err := MaglevTable(keys, bpf.MaglevM)
	if err != nil {
		panic(err) // bpf.MaglevM is a prime
	}
	if idx == nil {
		return nil
	}
	out := make([]uint32, len(idx))
	for i, j := range idx {
		out[i] = ids[j]
	}
	return out
}
