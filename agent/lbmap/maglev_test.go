package lbmap

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/kpfree/kpfree/bpf"
)

func maglevKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("10.244.%d.%d:8080", i/250, 1+i%250)
	}
	return keys
}

func mustTable(t *testing.T, keys []string, m int) []int {
	t.Helper()
	tbl, err := MaglevTable(keys, m)
	if err != nil {
		t.Fatal(err)
	}
	return tbl
}

// Every backend's preference list is a permutation of the slots, and the
// table is full.
func TestMaglevPermutationAndFull(t *testing.T) {
	const m = bpf.MaglevM
	for _, k := range maglevKeys(50) {
		off, skip := hashKey(0, k)%m, hashKey(1, k)%(m-1)+1
		seen := make([]bool, m)
		for j := uint64(0); j < m; j++ {
			c := (off + j*skip) % m
			if seen[c] {
				t.Fatalf("%s: slot %d repeats at step %d", k, c, j)
			}
			seen[c] = true
		}
	}
	for _, n := range []int{1, 2, 3, 10, 100, 1021, 1500} {
		tbl := mustTable(t, maglevKeys(n), m)
		if len(tbl) != m {
			t.Fatalf("n=%d: %d slots", n, len(tbl))
		}
		for i, v := range tbl {
			if v < 0 || v >= n {
				t.Fatalf("n=%d: slot %d holds %d", n, i, v)
			}
		}
	}
	if _, err := MaglevTable([]string{"a"}, 1000); err == nil {
		t.Fatal("non-prime size accepted")
	}
	if tbl := mustTable(t, nil, m); tbl != nil {
		t.Fatalf("no backends: %v", tbl)
	}
}

// Backends take one slot per turn: counts differ by at most one, so for
// n <= 10 each is within 1% of m/n (m/n >= 102).
func TestMaglevBalance(t *testing.T) {
	const m = bpf.MaglevM
	for n := 1; n <= 64; n++ {
		counts := make([]int, n)
		for _, v := range mustTable(t, maglevKeys(n), m) {
			counts[v]++
		}
		lo, hi := slices.Min(counts), slices.Max(counts)
		if hi-lo > 1 {
			t.Fatalf("n=%d: slot counts from %d to %d", n, lo, hi)
		}
		if n <= 10 {
			ideal := float64(m) / float64(n)
			for i, c := range counts {
				if d := float64(c) - ideal; d > ideal*0.01 || -d > ideal*0.01 {
					t.Fatalf("n=%d: backend %d has %d slots, ideal %.1f", n, i, c, ideal)
				}
			}
		}
	}
}

// Removing one of ten backends moves its own slots and only a few others;
// adding it back restores the table.
func TestMaglevMinimalDisruption(t *testing.T) {
	const m = bpf.MaglevM
	keys := maglevKeys(10)
	before := mustTable(t, keys, m)
	worst := 0
	for gone := range keys {
		rest := slices.Delete(slices.Clone(keys), gone, gone+1)
		after := mustTable(t, rest, m)
		moved := 0
		for i := range before {
			if keys[before[i]] != keys[gone] && keys[before[i]] != rest[after[i]] {
				moved++
			}
		}
		worst = max(worst, moved)
		// Measured: at most 27 slots of the remaining backends move (under
		// 3% of the table); the bound leaves room for other key sets.
		if moved > m/20 {
			t.Errorf("removing %s moved %d slots of other backends", keys[gone], moved)
		}
	}
	t.Logf("worst case: %d of %d slots of remaining backends moved", worst, m)
}

// The table depends on the set of keys only: the order they come in and the
// per-node backend ids make no difference to which backend a slot names.
func TestMaglevIndependentOfOrderAndIDs(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	var bes []Backend
	for i := range 7 {
		bes = append(bes, be(fmt.Sprintf("10.244.1.%d", 10+i), 8080))
	}
	ref := map[int]Backend{}
	idsA := []uint32{1, 2, 3, 4, 5, 6, 7}
	tblA := maglevIDs(bes, idsA)
	for i, id := range tblA {
		ref[i] = bes[slices.Index(idsA, id)]
	}
	for range 20 {
		perm := rng.Perm(len(bes))
		shuffled := make([]Backend, len(bes))
		ids := make([]uint32, len(bes))
		for i, p := range perm {
			shuffled[i] = bes[p]
			ids[i] = uint32(100 + rng.IntN(1000)*len(bes) + i) // distinct, unrelated to A's
		}
		for i, id := range maglevIDs(shuffled, ids) {
			if got := shuffled[slices.Index(ids, id)]; got != ref[i] {
				t.Fatalf("slot %d: %s, want %s", i, got, ref[i])
			}
		}
	}
	// Local plays no part in the key.
	loc := slices.Clone(bes)
	loc[0].Local = true
	if !slices.Equal(maglevIDs(loc, idsA), tblA) {
		t.Fatal("Local changed the table")
	}
	// A repeated backend (more slots in the services map) counts once.
	if !slices.Equal(maglevIDs(append(slices.Clone(bes), bes[0]), append(slices.Clone(idsA), 1)), tblA) {
		t.Fatal("a repeated backend changed the table")
	}
}
