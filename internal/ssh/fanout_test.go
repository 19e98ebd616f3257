package ssh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var errBoom = errors.New("boom")

func TestForEachAggregatesEveryError(t *testing.T) {
	hosts := []string{"node1", "node2", "node3", "node4", "node5"}
	var ran sync.Map
	err := ForEach(context.Background(), hosts, 2, func(h string) string { return h },
		func(ctx context.Context, h string) error {
			ran.Store(h, true)
			switch h {
			case "node2":
				time.Sleep(30 * time.Millisecond) // finishes after node4
				return fmt.Errorf("host node2: disk full:\nsecond line")
			case "node4":
				return fmt.Errorf("%w on node4", errBoom)
			}
			return nil
		})
	for _, h := range hosts {
		if _, ok := ran.Load(h); !ok {
			t.Errorf("%s did not run", h)
		}
	}
	var me *MultiError
	if !errors.As(err, &me) {
		t.Fatalf("err = %v, want *MultiError", err)
	}
	want := "failed on 2 of 5 hosts:\n  - node2: disk full:\n    second line\n  - node4: boom on node4"
	if err.Error() != want {
		t.Errorf("err =\n%s\nwant\n%s", err, want)
	}
	if !errors.Is(err, errBoom) {
		t.Error("errors.Is does not reach a host's error")
	}
	if m := me.Errors(); len(m) != 2 || !errors.Is(m["node4"], errBoom) {
		t.Errorf("Errors() = %v", m)
	}
	b, _ := json.Marshal(err)
	if string(b) != `{"total":5,"failed":[{"host":"node2","error":"host node2: disk full:\nsecond line"},{"host":"node4","error":"boom on node4"}]}` {
		t.Errorf("JSON %s", b)
	}
}

func TestForEachNilWhenAllSucceed(t *testing.T) {
	err := ForEach(context.Background(), []int{1, 2, 3}, 0, func(i int) string { return fmt.Sprint(i) },
		func(context.Context, int) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if err := ForEach(context.Background(), []int(nil), 4, nil, func(context.Context, int) error { return nil }); err != nil {
		t.Fatal(err)
	}
}

func TestForEachConcurrencyLimit(t *testing.T) {
	items := make([]int, 20)
	for i := range items {
		items[i] = i
	}
	var inFlight, maxInFlight atomic.Int32
	err := ForEach(context.Background(), items, 3, func(i int) string { return fmt.Sprint(i) },
		func(ctx context.Context, i int) error {
			n := inFlight.Add(1)
			for {
				m := maxInFlight.Load()
				if n <= m || maxInFlight.CompareAndSwap(m, n) {
					break
				}
			}
			time.Sleep(10 * time.Millisecond)
			inFlight.Add(-1)
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	if m := maxInFlight.Load(); m != 3 {
		t.Errorf("max in flight %d, want 3", m)
	}
}

func TestForEachCancelStopsNewWork(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var started atomic.Int32
	items := []string{"a", "b", "c", "d", "e"}
	err := ForEach(ctx, items, 1, func(s string) string { return s }, func(ctx context.Context, s string) error {
		started.Add(1)
		if s == "b" {
			cancel()
			return ctx.Err()
		}
		return nil
	})
	if n := started.Load(); n != 2 {
		t.Errorf("%d items started, want 2", n)
	}
	var me *MultiError
	if !errors.As(err, &me) || len(me.Failed) != 4 {
		t.Fatalf("err = %v, want b failed and c, d, e not started", err)
	}
	if me.Failed[0].Host != "b" || !errors.Is(me.Errors()["e"], ErrNotStarted) || !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v", err)
	}
}

func TestForEachRecoversPanic(t *testing.T) {
	err := ForEach(context.Background(), []string{"a", "b"}, 2, func(s string) string { return s },
		func(_ context.Context, s string) error {
			if s == "a" {
				panic("bug")
			}
			return nil
		})
	var me *MultiError
	if !errors.As(err, &me) || len(me.Failed) != 1 || me.Failed[0].Host != "a" {
		t.Fatalf("err = %v", err)
	}
}
